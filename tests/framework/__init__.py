"""Test framework for VM tests, in the shape of Firecracker's: a factory that owns every VM
a test builds (:mod:`tests.framework.factory`)."""
