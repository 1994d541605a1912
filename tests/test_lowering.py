"""Programs for GPU and TPU, lowered from this CPU with jax.export: no host callbacks, no branches."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import dropblock_jax as db
import dropblock_jax.nnx as db_nnx

X = jax.ShapeDtypeStruct((8, 14, 14, 64), jnp.float32)
KEY = jax.random.key(0)
VARIANTS = {
    "per-channel": dict(),
    "shared": dict(broadcast_dims=(-1,)),
}
# A custom call could be a host callback (a device-to-host trip); a data-dependent branch
# costs a GPU a read of its branch index back to the host.
FORBIDDEN = re.compile(r"stablehlo\.(custom_call|case|if|while)\b")


def _ops(exported) -> str:
    """The module's operations, without the location table (which names Python functions)."""
    return "\n".join(line for line in exported.mlir_module().splitlines() if not line.startswith("#loc"))


def _functional(kwargs, traced):
    if traced:
        return lambda key, x, keep: db.drop_block(key, x, keep, 7, **kwargs), (KEY, X, jnp.float32(0.9))
    return lambda key, x: db.drop_block(key, x, 0.9, 7, **kwargs), (KEY, X)


def _linen(kwargs, traced):
    layer = db.DropBlock(block_size=7, **kwargs)

    def apply(key, x, *keep):
        return layer.apply({}, x, deterministic=False, rngs={"dropout": key}, keep_prob=keep[0] if keep else 0.9)

    return apply, (KEY, X, jnp.float32(0.9)) if traced else (KEY, X)


def _nnx(kwargs, traced):
    graph, state = nnx.split(db_nnx.DropBlock(keep_prob=0.9, block_size=7, rngs=nnx.Rngs(dropout=0), **kwargs))

    def apply(state, x, *keep):
        layer = nnx.merge(graph, state)
        return layer(x, keep_prob=keep[0] if keep else None)

    return apply, (state, X, jnp.float32(0.9)) if traced else (state, X)


BUILDERS = {"drop_block": _functional, "linen": _linen, "nnx": _nnx}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("traced", [True, False], ids=["traced", "constant"])
def test_exports_for_accelerators_without_callbacks_or_branches(platform, builder, variant, traced):
    fn, args = BUILDERS[builder](VARIANTS[variant], traced)
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
    text = _ops(exported)
    assert exported.platforms == (platform,)
    assert "stablehlo.reduce_window" in text  # the block dilation is in the program
    assert not FORBIDDEN.search(text), FORBIDDEN.search(text).group(0)


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "constant"])
def test_compiled_program_has_no_conditional(traced):
    fn, args = _functional({}, traced)
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    assert "reduce-window" in hlo
    assert not re.search(r"\b(conditional|while)\(", hlo)


def test_the_checks_see_callbacks_and_branches():
    def with_callback(x):
        return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    def with_branch(x):
        return jax.lax.cond(x.sum() > 0, lambda v: v * 2, lambda v: v, x)

    # jax.export refuses host callbacks outright, so every export above is free of them.
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        jax.export.export(jax.jit(with_callback), platforms=["cpu"])(X)
    assert FORBIDDEN.search(_ops(jax.export.export(jax.jit(with_branch), platforms=["cuda"])(X)))
