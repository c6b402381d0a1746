"""Shared by the end-to-end tests."""
from rlhf_ray.utils.net import free_port  # noqa: F401  (re-exported for the tests)
