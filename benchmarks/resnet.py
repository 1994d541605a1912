"""A whole ResNet train step with regularizers where the DropBlock authors put them.

Each row is one jitted train step (forward, softmax cross-entropy, gradients, SGD with
momentum, batch-statistics update) of the same Flax Linen ResNet, differing only in the
regularizer applied after every batch norm of the residual branches of the last two
stages and after the batch norm of their projection shortcuts (29 places in
ResNet-50), as in the authors' TPU ResNet. The last stage uses ``keep_prob``, the one
before it ``1 - (1 - keep_prob) / 4``. Where a row uses a schedule, ``keep_prob`` comes
from ``optax.linear_schedule(1.0, 0.9, 1000)`` evaluated on a step counter that is an
argument of the jitted step, so it is traced.

Rows:
  none: no regularizer.
  dropout: ``flax.linen.Dropout(0.1)`` at the same places (its rate cannot be traced).
  dropblock: ``DropBlock(block_size=7)``, one mask per channel, scheduled keep_prob.
  dropblock-const: the same with ``keep_prob=0.9`` as a Python constant.
  dropblock-shared: ``broadcast_dims=(-1,)`` (one mask for all channels), scheduled.

Columns, each also as a ratio to ``none``: the wall time of ``lower(...).compile()``
with JAX's caches cleared before each row and no persistent cache; XLA's cost analysis
("bytes accessed", "flops"); the compiled temporary memory; the step time, median and
minimum over ``--rounds`` rounds that each time every row once (round-robin, so a slow
phase of a shared machine falls on all rows alike), after one warm-up call per row.
The JSON output also holds each compile's process CPU time.

Stdout holds a header line and one markdown table; progress goes to stderr.

Usage:
  python benchmarks/resnet.py                                 # ResNet-50, 224 px, batch 8
  python benchmarks/resnet.py --depth 18 --image-size 112 --rounds 20
  python benchmarks/resnet.py --variants none,dropblock --json resnet.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import dropblock_jax as db

# A persistent cache would turn the compile-time column into a disk read.
jax.config.update("jax_enable_compilation_cache", False)

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
WIDTHS = (64, 128, 256, 512)
BLOCK_SIZE, DROPOUT_RATE, CONSTANT_KEEP_PROB = 7, 0.1, 0.9
SCHEDULE = optax.linear_schedule(init_value=1.0, end_value=0.9, transition_steps=1000)

VARIANTS = {
    "none": "none",
    "dropout": "nn.Dropout(0.1)",
    "dropblock": "DropBlock per-channel, traced keep_prob",
    "dropblock-const": "DropBlock per-channel, constant keep_prob",
    "dropblock-shared": "DropBlock shared (-1,), traced keep_prob",
}
SCHEDULED = {"dropblock", "dropblock-shared"}


class Regularizer(nn.Module):
    """The regularizer of one variant at one place; ``keep_prob`` is that stage's."""

    variant: str

    @nn.compact
    def __call__(self, x, keep_prob):
        if self.variant == "none":
            return x
        if self.variant == "dropout":
            return nn.Dropout(DROPOUT_RATE, deterministic=False)(x)
        broadcast_dims = (-1,) if self.variant == "dropblock-shared" else ()
        return db.DropBlock(block_size=BLOCK_SIZE, broadcast_dims=broadcast_dims, deterministic=False)(
            x, keep_prob=keep_prob
        )


class ResidualBlock(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block.

    ``keep_prob`` None means this stage carries no regularizer.
    """

    width: int
    strides: int
    kind: str
    variant: str

    @nn.compact
    def __call__(self, x, train: bool, keep_prob):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, use_bias=False)

        def regularize(y):
            return y if keep_prob is None else Regularizer(self.variant)(y, keep_prob)

        if self.kind == "bottleneck":
            shapes = [((1, 1), 1), ((3, 3), self.strides), ((1, 1), 1)]
            widths = [self.width, self.width, 4 * self.width]
        else:
            shapes = [((3, 3), self.strides), ((3, 3), 1)]
            widths = [self.width, self.width]
        y = x
        for i, ((kernel, strides), width) in enumerate(zip(shapes, widths)):
            last = i == len(shapes) - 1
            y = conv(width, kernel, strides, padding=[(k // 2, k // 2) for k in kernel])(y)
            # The last norm starts at zero so that each block starts as the identity.
            y = norm(scale_init=nn.initializers.zeros if last else nn.initializers.ones)(y)
            # The authors' model regularizes after the activation where there is one.
            y = regularize(y if last else nn.relu(y))
        shortcut = x
        if x.shape[-1] != y.shape[-1] or self.strides != 1:
            shortcut = conv(y.shape[-1], (1, 1), self.strides)(x)
            shortcut = regularize(norm()(shortcut))
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet-18/50 on NHWC images: 7x7/2 stem, max pool, four stages, average pool, dense."""

    depth: int = 50
    num_classes: int = 1000
    variant: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = True, keep_prob=CONSTANT_KEEP_PROB):
        kind, stage_sizes = DEPTHS[self.depth]
        x = nn.Conv(WIDTHS[0], (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
        stage_keep = [None, None, 1.0 - (1.0 - keep_prob) / 4.0, keep_prob]
        for stage, (blocks, width) in enumerate(zip(stage_sizes, WIDTHS)):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, strides, kind, self.variant)(x, train, stage_keep[stage])
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def make_train_step(model: ResNet, optimizer: optax.GradientTransformation, scheduled: bool) -> Callable:
    def train_step(params, batch_stats, opt_state, images, labels, key, step):
        keep_prob = SCHEDULE(step) if scheduled else CONSTANT_KEEP_PROB

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                keep_prob=keep_prob,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, new_opt_state, loss

    return train_step


def _cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    # Older jax versions return one dict per computation.
    if isinstance(analysis, (list, tuple)):
        merged: dict = {}
        for entry in analysis:
            for name, value in (entry or {}).items():
                merged[name] = merged.get(name, 0.0) + value
        analysis = merged
    return analysis or {}


class Row:
    """One variant's compiled step, its static costs and its timings."""

    def __init__(self, name: str, step: Callable, args: tuple):
        self.name, self.step, self.args = name, step, args
        self.compile_s, self.compile_cpu_s = math.inf, math.inf
        self.compile_once()
        cost = _cost(self.compiled)
        self.bytes_accessed = float(cost.get("bytes accessed", math.nan))
        self.flops = float(cost.get("flops", math.nan))
        self.temp_bytes = float(getattr(self.compiled.memory_analysis(), "temp_size_in_bytes", math.nan))
        jax.block_until_ready(self.compiled(*args))
        self.times: list[float] = []

    def compile_once(self):
        """Compiles from scratch, keeping the fastest compile seen (the noise is one-sided)."""
        jax.clear_caches()
        start, start_cpu = time.perf_counter(), time.process_time()
        self.compiled = jax.jit(self.step).lower(*self.args).compile()
        self.compile_s = min(self.compile_s, time.perf_counter() - start)
        # CPU time is less swayed than wall time by other jobs on a shared machine.
        self.compile_cpu_s = min(self.compile_cpu_s, time.process_time() - start_cpu)

    def time_once(self):
        start = time.perf_counter()
        jax.block_until_ready(self.compiled(*self.args))
        self.times.append(time.perf_counter() - start)

    def metrics(self) -> dict:
        return {
            "regularizer": VARIANTS[self.name],
            "variant": self.name,
            "compile_s": self.compile_s,
            "compile_cpu_s": self.compile_cpu_s,
            "bytes_accessed": self.bytes_accessed,
            "flops": self.flops,
            "temp_bytes": self.temp_bytes,
            "step_ms_median": statistics.median(self.times) * 1e3,
            "step_ms_min": min(self.times) * 1e3,
        }


def _progress(message: str):
    print(message, file=sys.stderr, flush=True)


def run(
    depth: int,
    image_size: int,
    batch: int,
    rounds: int,
    variants: Sequence[str],
    num_classes: int,
    schedule_step: int,
    compile_rounds: int = 1,
) -> list[dict]:
    init_model = ResNet(depth, num_classes, "none")
    # Regularizers hold no parameters and the head follows a global pool, so one small
    # init serves every variant and every image size.
    variables = jax.jit(functools.partial(init_model.init, train=False))(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(params)
    images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, num_classes)
    # The same arrays are reused by every call, so nothing is donated.
    args = (params, batch_stats, opt_state, images, labels, jax.random.key(3), jnp.int32(schedule_step))

    rows = []
    for name in variants:
        _progress(f"compiling {name} ...")
        model = ResNet(depth, num_classes, name)
        rows.append(Row(name, make_train_step(model, optimizer, name in SCHEDULED), args))
        _progress(f"  {rows[-1].compile_s:.1f} s")
    for round_index in range(1, compile_rounds):
        for row in rows:
            row.compile_once()
        _progress(
            f"compile round {round_index + 1}/{compile_rounds}: " + ", ".join(f"{r.compile_s:.1f}" for r in rows) + " s"
        )
    for round_index in range(rounds):
        for row in rows:
            row.time_once()
        _progress(f"round {round_index + 1}/{rounds}: " + ", ".join(f"{r.times[-1] * 1e3:.0f}" for r in rows) + " ms")
    return [row.metrics() for row in rows]


def table(results: list[dict]) -> list[str]:
    base = next((r for r in results if r["variant"] == "none"), None)

    def ratio(result, field):
        return f"{result[field] / base[field]:.3f}" if base else "-"

    lines = [
        "| regularizer | compile s | compile / none | compile CPU / none | bytes accessed / none | flops / none "
        "| temp MB | temp / none | step ms median | step ms min | step / none (median) | step / none (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['regularizer']} | {r['compile_s']:.2f} | {ratio(r, 'compile_s')} | {ratio(r, 'compile_cpu_s')} | "
            f"{ratio(r, 'bytes_accessed')} | {ratio(r, 'flops')} | {r['temp_bytes'] / 2**20:.1f} | "
            f"{ratio(r, 'temp_bytes')} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | "
            f"{ratio(r, 'step_ms_median')} | {ratio(r, 'step_ms_min')} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, choices=sorted(DEPTHS), default=50)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds (median and min)")
    parser.add_argument(
        "--compile-rounds", type=int, default=3, help="round-robin compiles per row (the minimum is reported)"
    )
    parser.add_argument(
        "--variants",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=list(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--schedule-step",
        type=int,
        default=1000,
        help="the step counter's value; 1000 (the schedule's end, keep_prob 0.9) makes the "
        "scheduled rows draw at the constant row's rate",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.compile_rounds < 1:
        parser.error("--rounds and --compile-rounds must be at least 1")

    device = jax.devices()[0]
    header = (
        f"jax {jax.__version__}, flax {flax.__version__}, {device.platform}: {device.device_kind}, "
        f"{platform.processor() or platform.machine()}; ResNet-{args.depth}, image {args.image_size}, "
        f"batch {args.batch}; train step; min of {args.compile_rounds} compiles, {args.rounds} timed rounds, "
        "each round-robin"
    )
    results = run(
        args.depth,
        args.image_size,
        args.batch,
        args.rounds,
        args.variants,
        args.num_classes,
        args.schedule_step,
        args.compile_rounds,
    )
    print("\n".join([header, "", *table(results)]), flush=True)
    if args.json:
        info = {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "backend": device.platform,
            "device_kind": device.device_kind,
            "processor": platform.processor() or platform.machine(),
            "depth": args.depth,
            "image_size": args.image_size,
            "batch": args.batch,
            "rounds": args.rounds,
            "compile_rounds": args.compile_rounds,
            "schedule_step": args.schedule_step,
        }
        with open(args.json, "w") as file:
            json.dump({**info, "rows": results}, file, indent=2)


if __name__ == "__main__":
    main()
