"""The paper's gamma against the calibrated gamma: expected and realized keep fractions.

By default, for each map size, block 7 and keep_prob 0.9, prints the seed rate, the exact
expected keep fraction and the keep fraction realized over many masks (mean +- standard
error).

With ``--sweep``, prints the exact expected keep fraction of both gammas for keep_prob from
0.95 down to 0, on the map sizes of ResNet-50 at 224 px (56, 28, 14 and 7) in the valid
region and on 14x14 and 7x7 maps in the "everywhere" region; no masks are drawn.

Usage:
  python benchmarks/gamma_table.py [--keep-prob 0.9] [--block-size 7] [--draws 64]
  python benchmarks/gamma_table.py --sweep [--block-size 7]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import dropblock_jax as db

MAP_SIZES = (7, 14, 28, 56)
# --sweep: the keep_probs asked, and the (map size, seed region) rows.
SWEEP_KEEP_PROBS = (0.95, 0.9, 0.75, 0.5, 0.25, 0.1, 0.001, 0.0)
SWEEP_MAPS = ((56, "valid"), (28, "valid"), (14, "valid"), (7, "valid"), (14, "everywhere"), (7, "everywhere"))


def table(keep_prob: float, block_size: int, draws: int, seed_region: str) -> list[str]:
    lines = [
        f"keep_prob {keep_prob}, block {block_size}, seed_region {seed_region!r}, "
        f"{draws} masks of (8, s, s, 32) per row",
        "",
        "| map | gamma | seed rate | expected keep | realized keep (mean +- s.e.) |",
        "|---|---|---:|---:|---:|",
    ]
    for size in MAP_SIZES:
        shape = (8, size, size, 32)
        for gamma in ("paper", "calibrated"):
            rate = db.seed_rate(keep_prob, (size, size), block_size, seed_region=seed_region, gamma=gamma)
            expected = db.expected_keep_fraction(rate, (size, size), block_size, seed_region=seed_region)
            keys = jax.random.split(jax.random.key(size), draws)
            realized = np.asarray(
                jax.jit(
                    jax.vmap(
                        lambda k, shape=shape, gamma=gamma: db.block_mask(
                            k, shape, keep_prob, block_size, seed_region=seed_region, gamma=gamma
                        ).mean()
                    )
                )(keys)
            )
            error = realized.std(ddof=1) / np.sqrt(draws)
            lines.append(
                f"| {size}x{size} | {gamma} | {float(rate):.5f} | {float(expected):.4f} | "
                f"{realized.mean():.4f} +- {error:.4f} |"
            )
    return lines


def sweep(block_size: int) -> list[str]:
    """Expected keep fraction of each gamma, one row per (map, region, gamma), one column per keep_prob."""
    lines = [
        "| map | seed region | gamma | " + " | ".join(f"{p:g}" for p in SWEEP_KEEP_PROBS) + " |",
        "|---|---|---|" + "---:|" * len(SWEEP_KEEP_PROBS),
    ]
    for size, seed_region in SWEEP_MAPS:
        for gamma in ("paper", "calibrated"):
            kept = []
            for keep_prob in SWEEP_KEEP_PROBS:
                rate = db.seed_rate(keep_prob, (size, size), block_size, seed_region=seed_region, gamma=gamma)
                kept.append(db.expected_keep_fraction(rate, (size, size), block_size, seed_region=seed_region))
            lines.append(
                f"| {size}x{size} | {seed_region} | {gamma} | " + " | ".join(f"{float(k):.3f}" for k in kept) + " |"
            )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-prob", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--seed-region", default="valid", choices=("valid", "everywhere"))
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="the expected keep fraction of both gammas over keep_prob 0.95 to 0 on ResNet-50's map sizes",
    )
    args = parser.parse_args()
    if args.sweep:
        print("\n".join(sweep(args.block_size)))
        return
    print("\n".join(table(args.keep_prob, args.block_size, args.draws, args.seed_region)))


if __name__ == "__main__":
    main()
