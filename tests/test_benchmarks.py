"""benchmarks/: tiny runs print one table each, with every row and sane numbers.

Smoke tests only: the values measured here (at XLA optimization level 0, on tiny
shapes) say nothing about speed.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"
# Runs the benchmark scripts: newest versions only (make test-min leaves them out).
pytestmark = pytest.mark.launches


def run_script(name, *args):
    # LLVM's optimizations are most of a compile; smoke tests measure nothing and skip them.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def markdown_table(stdout):
    """The header cells and the rows of the only table on stdout, after checking it is the only one."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    separators = [i for i, line in enumerate(lines) if set(line) <= set("|-:")]
    assert len(separators) == 1, stdout
    header = lines[separators[0] - 1]
    assert lines.count(header) == 1, stdout
    assert separators[0] == 1, stdout

    def cells(line):
        return [cell.strip() for cell in line.strip("|").split("|")]

    rows = [cells(line) for line in lines[2:]]
    return cells(header), rows


def assert_finite_positive(texts):
    values = [float(text) for text in texts]
    assert all(math.isfinite(v) and v > 0 for v in values), texts


# A tiny ResNet-18 (group 1 eight channels wide) on 32 px images: the structure of the
# step, at a fraction of ResNet-50's compile time.
TINY_RESNET = ("--depth", "18", "--base-width", "8", "--image-size", "32", "--batch", "2", "--num-classes", "10")
TINY_RUN = ("--rounds", "1", "--compile-rounds", "1")
RESNET_FIELDS = ("compile_s", "compile_cpu_s", "bytes_accessed", "flops", "temp_bytes", "step_ms_median", "step_ms_min")


def test_resnet_prints_one_table_with_every_variant(tmp_path):
    from_json = tmp_path / "resnet.json"
    stdout = run_script(
        "resnet.py", *TINY_RESNET, *TINY_RUN, "--dtypes", "float32", "--places", "all", "--json", str(from_json)
    )
    assert stdout.splitlines()[0].startswith("jax "), stdout
    assert "ResNet-18" in stdout.splitlines()[0]
    header, rows = markdown_table(stdout)
    assert header[:3] == ["regularizer", "dtype", "places"] and len(header) == 14
    assert [row[0] for row in rows] == [
        "none",
        "nn.Dropout(0.1)",
        "DropBlock per-channel, traced keep_prob",
        "DropBlock per-channel, constant keep_prob",
        "DropBlock shared (-1,), traced keep_prob",
    ]
    # ResNet-18's groups 3 and 4: two blocks of two branch places and a shortcut each.
    assert [row[1:3] for row in rows] == [["float32", "0"]] + [["float32", "12"]] * 4
    for row in rows:
        assert len(row) == len(header)
        assert_finite_positive(row[3:])
    ratios = [i for i, name in enumerate(header) if "/ none" in name]
    assert len(ratios) == 7 and all(rows[0][i] == "1.000" for i in ratios)
    results = json.loads(from_json.read_text())
    assert results["depth"] == 18 and [r["regularizer"] for r in results["rows"]] == [row[0] for row in rows]
    for r in results["rows"]:
        assert_finite_positive([r[k] for k in RESNET_FIELDS])


def test_resnet_rows_per_dtype_and_placement_are_relative_to_their_dtypes_none():
    stdout = run_script(
        "resnet.py", *TINY_RESNET, *TINY_RUN, "--variants", "none,dropblock-const", "--dtypes", "bfloat16,float32"
    )
    header, rows = markdown_table(stdout)
    # Every shortcut of groups 3 and 4, then the projection shortcuts only (one per group).
    assert [tuple(row[1:3]) for row in rows] == [
        ("bfloat16", "0"),
        ("bfloat16", "12"),
        ("bfloat16", "10"),
        ("float32", "0"),
        ("float32", "12"),
        ("float32", "10"),
    ]
    ratios = [i for i, name in enumerate(header) if "/ none" in name]
    assert all(rows[0][i] == rows[3][i] == "1.000" for i in ratios)
    for row in rows:
        assert_finite_positive(row[3:])


def test_bench_prints_one_table_with_every_row():
    stdout = run_script("bench.py", "--repeats", "1", "--shapes", "2,16,16,16")
    header, rows = markdown_table(stdout)
    assert header[:4] == ["shape", "dtype", "masks", "pass"]
    keys = [tuple(row[:4]) for row in rows]
    masks = ["nn.Dropout(0.1)", "x * 2", "DropBlock per-channel", "DropBlock shared (-1,)"]
    assert keys == [("(2, 16, 16, 16)", "float32", m, p) for p in ("forward", "fwd+bwd") for m in masks]
    for row in rows:
        assert len(row) == len(header)
        # The elementwise pass needs no temporary memory: zero is a fair value there.
        times, memory = row[4:10] + row[11:], row[10]
        assert_finite_positive(times)
        assert math.isfinite(float(memory)) and float(memory) >= 0
