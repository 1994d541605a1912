"""The paper's gamma against the calibrated gamma: expected and realized keep fractions.

For each map size, block 7 and keep_prob 0.9, prints the seed rate, the exact expected
keep fraction and the keep fraction realized over many masks (mean +- standard error).

Usage:
  python benchmarks/gamma_table.py [--keep-prob 0.9] [--block-size 7] [--draws 64]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import dropblock_jax as db

MAP_SIZES = (7, 14, 28, 56)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-prob", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--seed-region", default="valid", choices=("valid", "everywhere"))
    args = parser.parse_args()
    print("\n".join(table(args.keep_prob, args.block_size, args.draws, args.seed_region)))


if __name__ == "__main__":
    main()
