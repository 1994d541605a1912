"""``python -m dropblock_jax.demo``: mask pictures and a small, honest training comparison."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

# The default: 300 training images (30 a class) overfit within a few epochs (train
# accuracy 100%), and 30 epochs x 3 seeds x 5 methods fit in a few minutes on 2 cores.
DEFAULTS = dict(seeds=3, epochs=30, train_size=300, max_test=None, batch_size=50, eval_every=2)
# The smoke run: its time goes to compiling the four model variants.
QUICK = dict(seeds=2, epochs=3, train_size=100, max_test=300, batch_size=25, eval_every=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dropblock_jax.demo",
        description=(
            "Draws DropBlock masks and trains a small ResNet (Flax NNX) with no regularizer, "
            "dropout, SpatialDropout, DropBlock and scheduled DropBlock over several seeds. "
            "Writes masks.png, curves.png and results.json into --out."
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
    parser.add_argument("--seeds", type=int, help=f"seeds per method (default {DEFAULTS['seeds']}, quick {QUICK['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']}, quick {QUICK['epochs']})")
    parser.add_argument(
        "--train-size",
        type=int,
        help=f"training images, class-balanced (digits default {DEFAULTS['train_size']}; "
        "--data default: all of x_train)",
    )
    parser.add_argument("--scale", type=int, help="integer upscaling of the images (digits default 2: 16x16; --data default 1)")
    parser.add_argument("--keep-prob", type=float, default=0.8, help="keep_prob of the last stage, all methods (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=3, help="DropBlock block size (default %(default)s)")
    return parser


def _check_positive(parser, name, value, low=1):
    if value is not None and value < low:
        parser.error(f"{name} must be >= {low}, got {value}.")


def _summary(runs):
    test = np.asarray([r["test_accuracy"] for r in runs]) * 100
    train = np.asarray([r["train_accuracy"] for r in runs]) * 100
    step = np.asarray([r["seconds_per_step"] for r in runs]) * 1000
    return dict(
        test_mean=float(test.mean()),
        test_std=float(test.std(ddof=1)) if len(test) > 1 else 0.0,
        train_mean=float(train.mean()),
        ms_per_step=float(np.median(step)),
    )


def format_table(summaries: dict) -> str:
    """The results as a fixed-width text table, one row per method."""
    header = f"{'method':<21} {'held-out acc (%)':>17} {'train acc (%)':>14} {'ms/step':>8}"
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        held_out = f"{s['test_mean']:.2f} ± {s['test_std']:.2f}"
        lines.append(f"{name:<21} {held_out:>17} {s['train_mean']:>14.2f} {s['ms_per_step']:>8.1f}")
    return "\n".join(lines)


def _missing_demo_packages() -> list[str]:
    missing = []
    for module, package in (("optax", "optax"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit status. See ``python -m dropblock_jax.demo --help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs", "train_size", "scale", "block_size"):
        _check_positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if not 0.0 <= args.keep_prob <= 1.0:
        parser.error(f"--keep-prob must be in [0, 1], got {args.keep_prob}.")
    missing = _missing_demo_packages()
    if missing:
        parser.error(f"the demo needs {', '.join(missing)}: pip install 'dropblock-jax[demo]'.")

    if args.quick:
        # Read when JAX first initializes its backend, which nothing before this line does.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

    from tqdm import tqdm

    from dropblock_jax.demo import data as data_lib
    from dropblock_jax.demo import plots
    from dropblock_jax.demo.train import METHODS, TrainConfig, train_one

    preset = QUICK if args.quick else DEFAULTS
    seeds = args.seeds or preset["seeds"]
    epochs = args.epochs or preset["epochs"]
    started = time.perf_counter()
    try:
        if args.data is None:
            scale = args.scale or 2
            dataset = data_lib.load_digits(args.train_size or preset["train_size"], scale)
        else:
            dataset = data_lib.load_npz(args.data, args.train_size, args.scale or 1)
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

    plots.plot_mask_gallery(os.path.join(args.out, "masks.png"))

    results = {}
    for method in METHODS:
        runs = []
        with tqdm(total=seeds * epochs, desc=f"{method.name:<20}", unit="epoch", file=sys.stderr) as bar:
            for seed in range(seeds):

                def on_epoch(epoch, held_out, seed=seed):
                    bar.set_postfix(seed=seed, held_out=f"{held_out:.3f}")
                    bar.update(1)

                runs.append(dataclasses.asdict(train_one(method, seed, dataset, config, on_epoch)))
        results[method.name] = runs

    summaries = {name: _summary(runs) for name, runs in results.items()}
    table = format_table(summaries)
    wall = time.perf_counter() - started
    plots.plot_curves(
        os.path.join(args.out, "curves.png"),
        results,
        title=f"{dataset.name}, {len(dataset.x_train)} train images\nheld-out accuracy: mean, band = min..max over {seeds} seeds",
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
                runs=results,
                wall_seconds=wall,
                platform=platform.platform(),
            ),
            f,
            indent=1,
        )
    print()
    print(f"held-out accuracy: mean ± std over {seeds} seeds; train accuracy: mean; ms/step: median")
    print(table)
    print(f"\nwrote {', '.join(os.path.join(args.out, n) for n in ('masks.png', 'curves.png', 'results.json'))} in {wall:.0f} s")
    return 0
