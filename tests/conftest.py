"""Test session setup: a private model/compile cache unless the caller chose one, and repeatable
property tests (`make test` draws the same examples every run; `make fuzz` draws new ones)."""
import os
import tempfile

from hypothesis import settings

os.environ.setdefault("INFERCEPT_JAX_CACHE", os.path.join(tempfile.gettempdir(), "infercept_jax_test_cache"))

settings.register_profile("repeatable", derandomize=True, max_examples=150)
settings.register_profile("fuzz", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# tests/multidevice/ needs several devices, which only a process started with them has
# (tests/test_multidevice.py starts one).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]
