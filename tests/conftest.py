"""Test session setup: a private model/compile cache unless the caller chose one."""
import os
import tempfile

os.environ.setdefault("INFERCEPT_JAX_CACHE", os.path.join(tempfile.gettempdir(), "infercept_jax_test_cache"))
