"""The GPU tier (`make test-gpu`): each module carries `pytestmark = tier(...)` (tests/gpu/helpers.py), so
on a machine without CUDA every test here is collected and skipped."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
