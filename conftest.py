"""Test-session settings, applied before JAX initializes its backend."""

import importlib.util
import os

# The suite compiles hundreds of small programs; LLVM's optimization passes dominate
# their compile time on CPU and do not change the HLO, the random bits or the results
# the tests compare. Subprocesses (notebooks, the demo, multi-device checks) inherit it.
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# Keras picks its backend once, when it is first imported; dropblock_jax.keras runs on JAX only.
os.environ.setdefault("KERAS_BACKEND", "jax")

# Equinox is an optional extra: without it, its layer's module cannot be imported for
# its doctest, while the rest of the package can.
collect_ignore = []
try:
    import equinox  # noqa: F401
except ImportError:
    collect_ignore.append("dropblock_jax/equinox.py")
# Keras likewise; looked up, not imported, so that runs which do not use it do not pay for its import.
if importlib.util.find_spec("keras") is None:
    collect_ignore.append("dropblock_jax/keras.py")
