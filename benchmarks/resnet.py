"""A whole ResNet train step with regularizers where the DropBlock authors put them.

Each row is one jitted train step (forward, softmax cross-entropy, gradients, SGD with
momentum, batch-statistics update) of ``dropblock_jax.models.resnet``, differing only in
the regularizer, its places and the compute dtype. The authors' places (``tensorflow/tpu``
``models/official/resnet/resnet_model.py``) are groups 3 and 4, after every batch norm
of the residual branch and on every shortcut, identity shortcuts included: 36 places in
ResNet-50. Rows marked 29 regularize the projection shortcuts only
(``regularized_shortcuts="projection"``), for comparison. Group 4 uses ``keep_prob``,
group 3 ``1 - (1 - keep_prob) / 4``. Where a row uses a schedule, ``keep_prob`` comes
from ``dropblock_jax.linear_keep_prob_schedule(0.9, 1001)`` (1 at step 0, 0.9 from step
1000) evaluated on a step counter that is an argument of the jitted step, so it is traced.

Rows, in float32 and in bfloat16 (``dtype=jnp.bfloat16``: bfloat16 activations,
float32 parameters, batch statistics and logits):
  none: no regularizer.
  dropout: ``nnx.Dropout(0.1)`` at the same places (its rate cannot be traced).
  dropblock: ``DropBlock(block_size=7)``, one mask per channel, scheduled keep_prob.
  dropblock-const: the same with ``keep_prob=0.9`` a constant of the compiled step.
  dropblock-shared: ``broadcast_dims=(-1,)`` (one mask for all channels), scheduled.

Columns, each also as a ratio to ``none`` of the same dtype: the wall time of
``lower(...).compile()`` with JAX's caches cleared before each row and no persistent
cache; XLA's cost analysis ("bytes accessed", "flops"); the compiled temporary memory;
the step time, median and minimum over ``--rounds`` rounds that each time every row once
(round-robin, so a slow phase of a shared machine falls on all rows alike), after one
warm-up call per row. The JSON output also holds each compile's process CPU time.

Stdout holds a header line and one markdown table; progress goes to stderr.

Usage:
  python benchmarks/resnet.py                                 # ResNet-50, 224 px, batch 8
  python benchmarks/resnet.py --depth 18 --image-size 112 --rounds 20
  python benchmarks/resnet.py --variants none,dropblock --dtypes bfloat16 --places all
  python benchmarks/resnet.py --json resnet.json
"""

from __future__ import annotations

import argparse
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
from flax import nnx

from dropblock_jax import linear_keep_prob_schedule
from dropblock_jax.models import DEPTHS, resnet
from dropblock_jax.nnx import DropBlock

# A persistent cache would turn the compile-time column into a disk read.
jax.config.update("jax_enable_compilation_cache", False)

BLOCK_SIZE, CONSTANT_KEEP_PROB = 7, 0.9
SCHEDULE_STEPS = 1001
SCHEDULE = linear_keep_prob_schedule(CONSTANT_KEEP_PROB, SCHEDULE_STEPS)

VARIANTS = {
    "none": "none",
    "dropout": "nn.Dropout(0.1)",
    "dropblock": "DropBlock per-channel, traced keep_prob",
    "dropblock-const": "DropBlock per-channel, constant keep_prob",
    "dropblock-shared": "DropBlock shared (-1,), traced keep_prob",
}
SCHEDULED = {"dropblock", "dropblock-shared"}
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
# --places: every shortcut of groups 3 and 4 (the authors), or the projection shortcuts only.
PLACES = ("all", "projection")


def dropout(keep_prob: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # nnx.Dropout branches in Python on its rate, so it gets a concrete float.
    return nnx.Dropout(1.0 - keep_prob, rngs=rngs)


def shared_dropblock(keep_prob: float, rngs: nnx.Rngs) -> DropBlock:
    return DropBlock(keep_prob=keep_prob, block_size=BLOCK_SIZE, broadcast_dims=(-1,), rngs=rngs)


# What each variant puts at the model's regularizer places.
REGULARIZERS = {"none": "none", "dropout": dropout, "dropblock-shared": shared_dropblock}


def build_model(depth: int, num_classes: int, base_width: int, variant: str, places: str, dtype) -> nnx.Module:
    return resnet(
        depth,
        num_classes,
        regularizer=REGULARIZERS.get(variant, "dropblock"),
        keep_prob=CONSTANT_KEEP_PROB,
        block_size=BLOCK_SIZE,
        regularized_shortcuts=places,
        dtype=dtype,
        base_width=base_width,
        rngs=nnx.Rngs(params=0, dropout=1),
    )


def count_places(model: nnx.Module) -> int:
    return sum(isinstance(node, (DropBlock, nnx.Dropout)) for _, node in nnx.iter_graph(model))


def make_train_step(model: nnx.Module, variant: str, optimizer: optax.GradientTransformation) -> tuple[Callable, tuple]:
    """The jitted-to-be step and its arguments but the data: (params, batch_stats, rng_state, keep_probs, opt_state).

    ``keep_probs`` (the layers' keep_prob variables) is an argument of the scheduled
    rows, whose step overwrites it from the schedule; the constant row closes over it,
    so that its keep_prob is a constant of the compiled program, like a Python float.
    """
    graphdef, params, batch_stats, rng_state, keep_probs = nnx.split(model, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
    scheduled = variant in SCHEDULED
    constant_keep_probs = keep_probs

    def train_step(params, batch_stats, rng_state, keep_probs, opt_state, images, labels, step):
        def loss_fn(params):
            model = nnx.merge(
                graphdef, params, batch_stats, rng_state, keep_probs if scheduled else constant_keep_probs, copy=True
            )
            if scheduled:
                model.set_stage_keep_probs(SCHEDULE(step))
            logits = model(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            _, _, new_batch_stats, new_rng_state, _ = nnx.split(model, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
            return loss, (new_batch_stats, new_rng_state)

        (loss, (new_batch_stats, new_rng_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, new_rng_state, new_opt_state, loss

    return train_step, (params, batch_stats, rng_state, keep_probs if scheduled else None, optimizer.init(params))


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

    def __init__(self, name: str, dtype: str, places: str, num_places: int, step: Callable, args: tuple):
        self.name, self.dtype, self.places, self.num_places = name, dtype, places, num_places
        self.step, self.args = step, args
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
            "dtype": self.dtype,
            "shortcuts": self.places,
            "places": self.num_places,
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
    dtypes: Sequence[str] = tuple(DTYPES),
    places: Sequence[str] = PLACES,
    base_width: int = 64,
) -> list[dict]:
    optimizer = optax.sgd(0.1, momentum=0.9)
    images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, num_classes)
    # The same arrays are reused by every call, so nothing is donated.
    data = (images, labels, jnp.int32(schedule_step))

    rows = []
    for dtype in dtypes:
        # `none` has no places: one row per dtype serves both placements.
        configs = [(name, place) for place in places for name in variants if name != "none"]
        if "none" in variants:
            configs.insert(0, ("none", places[0]))
        for name, place in configs:
            _progress(f"compiling {name}, {dtype}, {place} shortcuts ...")
            model = build_model(depth, num_classes, base_width, name, place, DTYPES[dtype])
            step, state = make_train_step(model, name, optimizer)
            rows.append(Row(name, dtype, place, count_places(model), step, (*state, *data)))
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
    bases = {r["dtype"]: r for r in results if r["variant"] == "none"}

    def ratio(result, field):
        base = bases.get(result["dtype"])
        return f"{result[field] / base[field]:.3f}" if base else "-"

    lines = [
        "| regularizer | dtype | places | compile s | compile / none | compile CPU / none | bytes accessed / none "
        "| flops / none | temp MB | temp / none | step ms median | step ms min | step / none (median) "
        "| step / none (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['regularizer']} | {r['dtype']} | {r['places']} | {r['compile_s']:.2f} | {ratio(r, 'compile_s')} | "
            f"{ratio(r, 'compile_cpu_s')} | {ratio(r, 'bytes_accessed')} | {ratio(r, 'flops')} | "
            f"{r['temp_bytes'] / 2**20:.1f} | {ratio(r, 'temp_bytes')} | {r['step_ms_median']:.1f} | "
            f"{r['step_ms_min']:.1f} | {ratio(r, 'step_ms_median')} | {ratio(r, 'step_ms_min')} |"
        )
    return lines


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return values

    return parse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, choices=sorted(DEPTHS), default=50)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--base-width", type=int, default=64, help="width of group 1 (64 is the authors' network; smaller for tests)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds (median and min)")
    parser.add_argument(
        "--compile-rounds", type=int, default=3, help="round-robin compiles per row (the minimum is reported)"
    )
    parser.add_argument(
        "--variants",
        type=_choices(tuple(VARIANTS)),
        default=list(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--dtypes", type=_choices(tuple(DTYPES)), default=list(DTYPES), help="comma-separated: float32, bfloat16"
    )
    parser.add_argument(
        "--places",
        type=_choices(PLACES),
        default=list(PLACES),
        help="comma-separated: all (every shortcut, the authors' 36 places), projection (29)",
    )
    parser.add_argument(
        "--schedule-step",
        type=int,
        default=SCHEDULE_STEPS - 1,
        help="the step counter's value; %(default)s (the schedule's last step, keep_prob 0.9) makes the "
        "scheduled rows draw at the constant row's rate",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
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
        args.dtypes,
        args.places,
        args.base_width,
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
            "base_width": args.base_width,
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
