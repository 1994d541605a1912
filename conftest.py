"""Test-session settings, applied before JAX initializes its backend.

The suite's shared helpers and references are in ``tests/helpers.py``.
"""

import importlib.util
import os
import pathlib

import jax

# The suite compiles hundreds of small programs; LLVM's optimization passes dominate
# their compile time on CPU and do not change the HLO, the random bits or the results
# the tests compare. Subprocesses (notebooks, the demo, the examples) inherit it.
_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# Four CPU devices, so that the sharding tests run in the test process like any other
# test; arrays go to the first device unless a test shards them. Subprocesses keep one
# device (their own XLA_FLAGS say otherwise where several processes are the point).
jax.config.update("jax_num_cpu_devices", 4)

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

# Hypothesis profiles for tests/test_properties.py, chosen with HYPOTHESIS_PROFILE:
# "ci" (the default, what `make test` runs) tries the same few examples on every run;
# "thorough" draws many new ones, e.g. `HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`.
# No deadline: the first example of a new shape includes XLA's compile time.
# "thorough" keeps the failures it finds in .pytest_cache (git-ignored) and tries them first next time.
try:
    from hypothesis import settings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # an environment without the test dependencies; the property tests then fail to import
    pass
else:
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True)
    settings.register_profile(
        "thorough",
        max_examples=500,
        deadline=None,
        print_blob=True,
        database=DirectoryBasedExampleDatabase(pathlib.Path(__file__).parent / ".pytest_cache" / "hypothesis"),
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
