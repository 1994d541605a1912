"""The demo's dependencies, the ``demo`` extra: importing the demo without them names them all."""

import importlib.util

# The module each package of the extra provides.
DEMO_PACKAGES = {"optax": "optax", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}

# Looked up, not imported, so that the message lists every missing package, not the first
# one an import would stop at.
_missing = [package for module, package in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ImportError(
        f"the demo needs {', '.join(_missing)}, which are not installed: pip install '.[demo]' in a checkout "
        "(or make demo)."
    )
