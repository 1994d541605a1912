"""Speed and memory of drop_block against flax's nn.Dropout and an elementwise pass.

Prints one table to stdout (progress goes to stderr): median wall time of jitted
calls after warm-up, the ratio to
``nn.Dropout(0.1)`` and to ``x * 2`` (the memory floor: one read, one write) on the
same tensor in the same run, the compiled temporary memory as a fraction of the
input's bytes, and the first-call compile time. The "fwd+bwd" pass is a ``jax.vjp``
that returns both the output and the input's cotangent, for a fixed random output
cotangent drawn once outside the timing, so the backward pass reads a real gradient.

Usage:
  python benchmarks/bench.py              # the full table
  python benchmarks/bench.py --repeats 5 --shapes 16,28,28,512
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import flax
import jax
from flax import linen as nn

import dropblock_jax as db

SHAPES = [
    ((16, 28, 28, 512), "float32"),
    ((32, 56, 56, 64), "float32"),
    ((64, 14, 14, 1024), "float32"),
    ((16, 28, 28, 512), "bfloat16"),
]
KEEP_PROB, BLOCK_SIZE, DROPOUT_RATE = 0.9, 7, 0.1


def _dropout(key, x):
    return nn.Dropout(DROPOUT_RATE).apply({}, x, deterministic=False, rngs={"dropout": key})


def _elementwise(key, x):
    del key
    return x * 2


def _drop_block(broadcast_dims):
    def forward(key, x):
        return db.drop_block(key, x, KEEP_PROB, BLOCK_SIZE, broadcast_dims=broadcast_dims)

    return forward


def _forward(forward):
    def call(key, x, cotangent):
        del cotangent
        return forward(key, x)

    return call


def _forward_backward(forward):
    def vjp(key, x, cotangent):
        y, pullback = jax.vjp(lambda x: forward(key, x), x)
        (dx,) = pullback(cotangent)
        return y, dx

    return vjp


class Compiled:
    """One jitted function, compiled, with its compile time and temporary memory."""

    def __init__(self, function, *args):
        self.args = args
        start = time.perf_counter()
        self.compiled = jax.jit(function).lower(*self.args).compile()
        self.compile_s = time.perf_counter() - start
        self.temp_bytes = getattr(self.compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
        jax.block_until_ready(self.compiled(*self.args))
        self.times: list[float] = []

    def time_once(self):
        start = time.perf_counter()
        jax.block_until_ready(self.compiled(*self.args))
        self.times.append(time.perf_counter() - start)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.times) * 1e3


def measure(functions: dict, args: tuple, repeats: int) -> dict:
    """Compiles every function, then times them round-robin, so that the machine's
    slow phases fall on all of them alike and the ratios stay meaningful."""
    compiled = {name: Compiled(function, *args) for name, function in functions.items()}
    for _ in range(repeats):
        for entry in compiled.values():
            entry.time_once()
    return compiled


def run(shapes, repeats: int) -> list[str]:
    key = jax.random.key(0)
    lines = [
        f"jax {jax.__version__}, flax {flax.__version__}, {jax.devices()[0].platform}: "
        f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}; "
        f"keep_prob {KEEP_PROB}, block {BLOCK_SIZE}, medians and minima of {repeats} jitted calls",
        "",
        "| shape | dtype | masks | pass | median ms | / nn.Dropout | / x*2 | min ms | / nn.Dropout (min) | / x*2 (min) "
        "| temp mem / input | compile s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, dtype in shapes:
        x = jax.random.normal(jax.random.key(1), shape, dtype)
        # Drawn once, outside the timing: the backward pass of every entry gets the same one.
        cotangent = jax.random.normal(jax.random.key(2), shape, dtype)
        input_bytes = x.size * x.dtype.itemsize
        for pass_name, wrap in [("forward", _forward), ("fwd+bwd", _forward_backward)]:
            functions = {
                "nn.Dropout(0.1)": _dropout,
                "x * 2": _elementwise,
                "DropBlock per-channel": _drop_block(()),
                "DropBlock shared (-1,)": _drop_block((-1,)),
            }
            measured = measure({name: wrap(f) for name, f in functions.items()}, (key, x, cotangent), repeats)
            dropout, floor = measured["nn.Dropout(0.1)"], measured["x * 2"]
            for name, m in measured.items():
                lines.append(
                    f"| {shape} | {dtype} | {name} | {pass_name} | {m.median_ms:.2f} | "
                    f"{m.median_ms / dropout.median_ms:.3f} | {m.median_ms / floor.median_ms:.2f} | "
                    f"{m.min_ms:.2f} | {m.min_ms / dropout.min_ms:.3f} | {m.min_ms / floor.min_ms:.2f} | "
                    f"{m.temp_bytes / input_bytes:.2f} | {m.compile_s:.2f} |"
                )
            print("\n".join(lines[-len(measured) :]), file=sys.stderr, flush=True)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25, help="timed calls per entry (median)")
    parser.add_argument(
        "--shapes",
        type=lambda text: [(tuple(int(n) for n in text.split(",")), "float32")],
        default=SHAPES,
        help="one comma-separated float32 shape instead of the standard set",
    )
    args = parser.parse_args()
    lines = run(args.shapes, args.repeats)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
