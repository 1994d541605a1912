"""Test-session settings, applied before JAX initializes its backend."""

import os

# The suite compiles hundreds of small programs; LLVM's optimization passes dominate
# their compile time on CPU and do not change the HLO, the random bits or the results
# the tests compare. Subprocesses (notebooks, the demo, multi-device checks) inherit it.
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# Equinox is an optional extra: without it, its layer's module cannot be imported for
# its doctest, while the rest of the package can.
try:
    import equinox  # noqa: F401
except ImportError:
    collect_ignore = ["dropblock_jax/equinox.py"]
