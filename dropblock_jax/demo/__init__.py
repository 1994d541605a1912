"""The demo: ``python -m dropblock_jax.demo`` (or ``make demo``).

Draws a gallery of DropBlock masks and trains a small ResNet
(:class:`dropblock_jax.models.ResNet`) on scikit-learn's bundled digits, or on an
``.npz`` of one's own, with no regularizer, dropout, SpatialDropout, DropBlock and
DropBlock with a linear keep_prob schedule, over several seeds. Then scores every
trained model with DropBlock applied at inference (block 1 and the trained block) and
on occluded images, and compares the methods with no regularizer seed by seed, with
95% intervals. Needs the ``demo`` extra: ``pip install '.[demo]'`` from a checkout (or
``make demo``); without it, importing the demo is an ImportError that names what is
missing.
"""

import dropblock_jax.demo._requirements  # noqa: F401  (first: it names the missing extras)
from dropblock_jax.demo.cli import main

__all__ = ["main"]
