"""The security tests boot real sandboxes too: the shared VM fixtures."""

from tests.framework.fixtures import *  # noqa: F403
