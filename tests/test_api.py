"""The public names import as API.md lists them."""

import inspect

import dropblock_jax
import dropblock_jax.linen
import dropblock_jax.nnx
from helpers import DROP_BLOCK_OPTION_DEFAULTS


def test_public_names():
    for name in [
        "drop_block",
        "block_mask",
        "seed_rate",
        "expected_keep_fraction",
        "linear_keep_prob_schedule",
        "DropBlock",
    ]:
        assert name in dropblock_jax.__all__
        assert callable(getattr(dropblock_jax, name))
    assert dropblock_jax.DropBlock is dropblock_jax.linen.DropBlock
    assert callable(dropblock_jax.nnx.DropBlock)
    assert callable(dropblock_jax.nnx.set_keep_prob)


def test_signatures_follow_the_contract():
    params = inspect.signature(dropblock_jax.drop_block).parameters
    assert list(params)[:4] == ["key", "x", "keep_prob", "block_size"]
    assert params["block_size"].default == 7
    keyword_only = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert keyword_only == DROP_BLOCK_OPTION_DEFAULTS
    params = inspect.signature(dropblock_jax.block_mask).parameters
    assert list(params)[:4] == ["key", "shape", "keep_prob", "block_size"]
    params = inspect.signature(dropblock_jax.seed_rate).parameters
    assert list(params)[:3] == ["keep_prob", "feature_shape", "block_size"]
    params = inspect.signature(dropblock_jax.expected_keep_fraction).parameters
    assert list(params)[:3] == ["gamma", "feature_shape", "block_size"]
    params = inspect.signature(dropblock_jax.linear_keep_prob_schedule).parameters
    assert list(params) == ["keep_prob", "total_steps"]


def test_version_is_defined_once():
    from dropblock_jax._version import __version__

    assert dropblock_jax.__version__ == __version__
