"""The VM tests use the shared VM fixtures (tests/framework/fixtures.py)."""

from tests.framework.fixtures import *  # noqa: F403
