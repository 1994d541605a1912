"""``python -m dropblock_jax.demo``: mask pictures and a small, honest training comparison."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from dropblock_jax.demo.data import load_digits, load_npz, occlude
from dropblock_jax.demo.plots import plot_curves, plot_mask_gallery, plot_robustness
from dropblock_jax.demo.stats import mean_over_grid, paired_difference
from dropblock_jax.demo.train import METHODS, StressTest, TrainConfig, train_one

# The default: 300 training images (30 a class), which the network overfits within a few
# epochs (docs/demo.md). 5 seeds, because the paired intervals need them (Student's t
# quantile is 4.30 for 3 seeds, 2.78 for 5); 30 epochs x 5 seeds x 5 methods, held-out
# accuracy every 5 epochs and the stress tests of every model (docs/demo.md gives the time).
# Inference keep_probs of the robustness curves (the last stage's; the stage before keeps
# the training ratio). At 1.0 DropBlock is the identity: the clean accuracy.
DEFAULTS: dict[str, Any] = dict(
    seeds=5, epochs=30, train_size=300, max_test=None, batch_size=50, eval_every=5, eval_chunk=512,
    inference_keep_probs=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
)  # fmt: skip
# The smoke run: its time goes to compiling the four model variants (and their
# perturbed twins); a coarse keep_prob grid is enough to check that everything runs.
QUICK: dict[str, Any] = dict(
    seeds=2, epochs=3, train_size=100, max_test=300, batch_size=25, eval_every=1, eval_chunk=320,
    inference_keep_probs=(1.0, 0.75, 0.5),
)  # fmt: skip
# Seed of the inference masks and of the occluded squares: the same for every model.
STRESS_SEED = 0
BASELINE = "none"
# The paper's comparison (Section 4.1): DropBlock-trained against dropout-trained networks.
PAPER_BASELINE, PAPER_METHODS = "dropout", ("dropblock", "dropblock_scheduled")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dropblock_jax.demo",
        description=(
            "Draws DropBlock masks and trains a small ResNet (Flax NNX) with no regularizer, "
            "dropout, SpatialDropout, DropBlock and scheduled DropBlock over several seeds. "
            "Then scores every trained model with DropBlock applied at inference and with occluded "
            "images, and compares each method to no regularizer seed by seed. "
            "Writes masks.png, curves.png, robustness.png and results.json into --out."
        ),
    )
    parser.add_argument(
        "--data",
        metavar="FILE.npz",
        help="your own data: an .npz with arrays x_train, y_train, x_test, y_test (images NHWC, "
        "integer labels). Default: scikit-learn's bundled 8x8 digits, nothing downloaded.",
    )
    parser.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in under a minute: 100 images, 3 epochs, 2 seeds, XLA backend optimizations "
        "off (compiling dominates such a run; its ms/step are not comparable to a full run's)",
    )
    parser.add_argument(
        "--seeds", type=int, help=f"seeds per method (default {DEFAULTS['seeds']}, quick {QUICK['seeds']})"
    )
    parser.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']}, quick {QUICK['epochs']})")
    parser.add_argument(
        "--train-size",
        type=int,
        help=f"training images, class-balanced (digits default {DEFAULTS['train_size']}; "
        "--data default: all of x_train)",
    )
    parser.add_argument(
        "--scale", type=int, help="integer upscaling of the images (digits default 2: 16x16; --data default 1)"
    )
    parser.add_argument(
        "--keep-prob", type=float, default=0.8, help="keep_prob of the last stage, all methods (default %(default)s)"
    )
    parser.add_argument("--block-size", type=int, default=3, help="DropBlock block size (default %(default)s)")
    return parser


def _check_positive(parser: argparse.ArgumentParser, name: str, value: float | None, low: float = 1) -> None:
    if value is not None and value < low:
        parser.error(f"{name} must be >= {low}, got {value}.")


def _std(values: Sequence[float] | np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def run_metrics(run: dict, keep_probs: Sequence[float]) -> dict:
    """The per-run numbers the comparison is made on, in percent.

    ``clean`` and ``occlusion`` are held-out accuracies; ``area_b<k>`` is the mean
    accuracy over the inference keep_prob grid with block size k (the trapezoid area
    under the robustness curve divided by the grid's width).
    """
    metrics = dict(clean=run["test_accuracy"] * 100, occlusion=run["occlusion_accuracy"] * 100)
    for block, curve in run["robustness"].items():
        metrics[f"area_b{block}"] = mean_over_grid(keep_probs, np.asarray(curve) * 100)
    return metrics


def _summary(runs: list[dict], keep_probs: Sequence[float]) -> dict:
    test = np.asarray([r["test_accuracy"] for r in runs]) * 100
    train = np.asarray([r["train_accuracy"] for r in runs]) * 100
    step = np.asarray([r["seconds_per_step"] for r in runs]) * 1000
    occluded = np.asarray([r["occlusion_accuracy"] for r in runs]) * 100
    metrics = [run_metrics(r, keep_probs) for r in runs]
    areas = {name: float(np.mean([m[name] for m in metrics])) for name in metrics[0] if name.startswith("area_b")}
    return dict(
        test_mean=float(test.mean()),
        test_std=_std(test),
        occlusion_mean=float(occluded.mean()),
        occlusion_std=_std(occluded),
        **{f"{name}_mean": value for name, value in areas.items()},
        train_mean=float(train.mean()),
        ms_per_step=float(np.median(step)),
    )


def paired_statistics(results: dict, keep_probs: Sequence[float], baseline: str = BASELINE) -> dict:
    """Each method minus ``baseline``, seed by seed, for every metric of :func:`run_metrics`.

    Returns:
      ``{metric: {method: paired_difference dict}}`` for every method but the
      baseline; empty with fewer than 2 seeds (no interval can be formed).
    """
    if baseline not in results:
        raise ValueError(f"baseline must be one of the methods {sorted(results)}, got {baseline!r}.")
    if len(results[baseline]) < 2:
        return {}
    per_method = {name: [run_metrics(r, keep_probs) for r in runs] for name, runs in results.items()}
    base = per_method[baseline]
    paired = {}
    for metric in base[0]:
        paired[metric] = {
            name: paired_difference([m[metric] for m in metrics], [m[metric] for m in base])
            for name, metrics in per_method.items()
            if name != baseline
        }
    return paired


def _area_label(metric: str) -> str:
    return f"drop b{metric[len('area_b') :]}"


def format_table(summaries: dict) -> str:
    """The results as a fixed-width text table, one row per method."""
    areas = [key[: -len("_mean")] for key in next(iter(summaries.values())) if key.startswith("area_b")]
    header = (
        f"{'method':<21} {'held-out acc (%)':>17} {'occluded (%)':>14}"
        + "".join(f" {_area_label(a) + ' (%)':>12}" for a in areas)
        + f" {'train acc (%)':>14} {'ms/step':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        held_out = f"{s['test_mean']:.2f} ± {s['test_std']:.2f}"
        occluded = f"{s['occlusion_mean']:.2f} ± {s['occlusion_std']:.2f}"
        lines.append(
            f"{name:<21} {held_out:>17} {occluded:>14}"
            + "".join(f" {s[a + '_mean']:>12.2f}" for a in areas)
            + f" {s['train_mean']:>14.2f} {s['ms_per_step']:>8.1f}"
        )
    return "\n".join(lines)


def format_paired_table(paired: dict) -> str:
    """Differences to the baseline: ``mean [lower, upper]``, ``*`` when the interval excludes 0."""
    labels = {"clean": "held-out", "occlusion": "occluded"}
    metrics = list(paired)
    header = f"{'method':<21}" + "".join(f" {labels.get(m, _area_label(m)):>22} " for m in metrics)
    lines = [header, "-" * len(header)]
    for name in paired[metrics[0]]:
        cells = []
        for metric in metrics:
            d = paired[metric][name]
            mark = "*" if d["distinguishable"] else " "
            cells.append(f" {d['mean']:+6.2f} [{d['lower']:+6.2f},{d['upper']:+6.2f}]{mark}")
        lines.append(f"{name:<21}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit status. See ``python -m dropblock_jax.demo --help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs", "train_size", "scale", "block_size"):
        _check_positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if not 0.0 <= args.keep_prob <= 1.0:
        parser.error(f"--keep-prob must be in [0, 1], got {args.keep_prob}.")
    if args.quick:
        # Read when JAX first initializes its backend, which nothing before this line does
        # (importing JAX, Flax and the demo's modules does not).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

    preset = QUICK if args.quick else DEFAULTS
    seeds = args.seeds or preset["seeds"]
    epochs = args.epochs or preset["epochs"]
    started = time.perf_counter()
    try:
        if args.data is None:
            scale = args.scale or 2
            dataset = load_digits(args.train_size or preset["train_size"], scale)
        else:
            dataset = load_npz(args.data, args.train_size, args.scale or 1)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if preset["max_test"] is not None:
        # The smoke run scores on a slice of the held-out set; its numbers mean little.
        dataset = dataclasses.replace(
            dataset, x_test=dataset.x_test[: preset["max_test"]], y_test=dataset.y_test[: preset["max_test"]]
        )
    config = TrainConfig(
        epochs=epochs,
        batch_size=preset["batch_size"],
        eval_every=preset["eval_every"],
        eval_chunk=preset["eval_chunk"],
        keep_prob=args.keep_prob,
        block_size=args.block_size,
    )
    os.makedirs(args.out, exist_ok=True)
    print(f"data: {dataset.describe()}")
    print(
        f"model: ResNet widths {config.widths}, regularizer after the batch norms of the last two "
        f"stages and on their shortcuts; keep_prob {config.keep_prob} (stage before: "
        f"{1 - (1 - config.keep_prob) / 4:.3f}), block {config.block_size}; {epochs} epochs x {seeds} seeds"
    )

    plot_mask_gallery(os.path.join(args.out, "masks.png"))

    # A quarter of the image: a square of half its side, filled with the training
    # set's per-channel mean (what a standardized input carries when it carries nothing).
    _, height, width, _ = dataset.x_test.shape
    side = max(1, min(height, width) // 2)
    fill = dataset.x_train.mean(axis=(0, 1, 2))
    stress_test = StressTest(
        keep_probs=preset["inference_keep_probs"],
        block_sizes=tuple(sorted({1, config.block_size})),
        x_occluded=occlude(dataset.x_test, side, fill, seed=STRESS_SEED),
        key_seed=STRESS_SEED,
    )

    results = {}
    for method in METHODS:
        runs = []
        with tqdm(total=seeds * epochs, desc=f"{method.name:<20}", unit="epoch", file=sys.stderr) as bar:
            for seed in range(seeds):

                def on_epoch(epoch: int, held_out: float, seed: int = seed) -> None:
                    bar.set_postfix(seed=seed, held_out=f"{held_out:.3f}")
                    bar.update(1)

                runs.append(dataclasses.asdict(train_one(method, seed, dataset, config, on_epoch, stress_test)))
        results[method.name] = runs

    keep_probs = stress_test.keep_probs
    summaries = {name: _summary(runs, keep_probs) for name, runs in results.items()}
    paired = paired_statistics(results, keep_probs)
    paper_names = [n for n in (PAPER_BASELINE, *PAPER_METHODS) if n in results]
    paired_paper = paired_statistics({n: results[n] for n in paper_names}, keep_probs, PAPER_BASELINE)
    table = format_table(summaries)
    plot_robustness(
        os.path.join(args.out, "robustness.png"),
        results,
        keep_probs,
        title=f"{dataset.name}: DropBlock applied at inference at the regularizer places of every trained model\n"
        f"last stage at keep_prob, stage before at 1 - (1 - keep_prob) / 4; mean, band = min..max over {seeds} seeds",
    )
    wall = time.perf_counter() - started
    plot_curves(
        os.path.join(args.out, "curves.png"),
        results,
        title=f"{dataset.name}, {len(dataset.x_train)} train images\n"
        f"held-out accuracy: mean, band = min..max over {seeds} seeds",
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            dict(
                command="python -m dropblock_jax.demo " + " ".join(sys.argv[1:] if argv is None else argv),
                data=dataset.describe(),
                config=dataclasses.asdict(config),
                seeds=seeds,
                methods={m.name: dataclasses.asdict(m) for m in METHODS},
                summary=summaries,
                robustness=dict(
                    keep_probs=list(keep_probs),
                    block_sizes=list(stress_test.block_sizes),
                    key_seed=STRESS_SEED,
                    per_stage_ratio=True,
                    normalize="batch",
                    area="mean held-out accuracy (%) over the keep_prob grid: trapezoid area / grid width",
                ),
                occlusion=dict(side=side, fill=fill.tolist(), seed=STRESS_SEED),
                paired=dict(baseline=BASELINE, interval="95% Student t over seeds", metrics=paired),
                paired_to_dropout=dict(
                    baseline=PAPER_BASELINE, interval="95% Student t over seeds", metrics=paired_paper
                ),
                runs=results,
                wall_seconds=wall,
                platform=platform.platform(),
            ),
            f,
            indent=1,
        )
    print()
    print(
        f"held-out and occluded ({side}x{side} square) accuracy: mean ± std over {seeds} seeds; drop b<k>: mean "
        f"accuracy over inference keep_prob {keep_probs[0]}..{keep_probs[-1]} with block k; train accuracy: mean; "
        "ms/step: median"
    )
    print(table)
    if paired:
        print(
            f"\ndifference to {BASELINE}, seed by seed (points of %): mean [95% t interval over {seeds} seeds]; "
            "* = the interval excludes 0"
        )
        print(format_paired_table(paired))
        print(f"\ndifference to {PAPER_BASELINE} (the paper's comparison), the same way")
        print(format_paired_table(paired_paper))
    else:
        print("\n(one seed: no paired intervals; run --seeds 2 or more)")
    names = ("masks.png", "curves.png", "robustness.png", "results.json")
    print(f"\nwrote {', '.join(os.path.join(args.out, n) for n in names)} in {wall:.0f} s")
    return 0
