"""Test session setup: a private model/compile cache unless the caller chose one, repeatable
property tests (`make test` draws the same examples every run; `make fuzz` draws new ones), and
float32 matmuls in float32 everywhere."""
import os
import tempfile

import jax
from hypothesis import settings

os.environ.setdefault("INFERCEPT_JAX_CACHE", os.path.join(tempfile.gettempdir(), "infercept_jax_test_cache"))

settings.register_profile("repeatable", derandomize=True, max_examples=150)
settings.register_profile("fuzz", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# The tests compare float32 logits with transformers and numpy at tight tolerances. JAX multiplies
# float32 in TF32 on GPU by default (a 10-bit mantissa); on CPU it multiplies in float32 either way,
# so this changes nothing there.
jax.config.update("jax_default_matmul_precision", "highest")

# tests/multidevice/ needs several devices, which only a process started with them has
# (tests/test_multidevice.py starts one).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]
