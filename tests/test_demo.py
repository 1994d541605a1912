"""python -m dropblock_jax.demo: the quick run's outputs, and clear errors for bad --data."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dropblock_jax.demo import main
from dropblock_jax.demo.data import DataError, load_digits, load_npz
from dropblock_jax.demo.train import METHODS

METHOD_NAMES = [m.name for m in METHODS]


def test_quick_run_writes_the_pictures_the_results_and_a_table_with_every_method(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, "-m", "dropblock_jax.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("masks.png", "curves.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    table = done.stdout[done.stdout.index("method") :].splitlines()
    assert [line.split()[0] for line in table[2 : 2 + len(METHODS)]] == METHOD_NAMES
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == METHOD_NAMES
    for name in METHOD_NAMES:
        runs = results["runs"][name]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["seconds_per_step"] > 0 for r in runs)
    scheduled = results["runs"]["dropblock_scheduled"][0]["keep_prob_curve"]
    assert scheduled == sorted(scheduled, reverse=True) and scheduled[-1] == pytest.approx(0.8)
    assert "epoch" in done.stderr  # the progress bars


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def good_arrays(n_train=12, n_test=6, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.random((n_train, *shape), np.float32),
        y_train=np.arange(n_train) % 3,
        x_test=rng.random((n_test, *shape), np.float32),
        y_test=np.arange(n_test) % 3,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(x_test=None), r"lacks array\(s\) x_test; it has \['x_train', 'y_test', 'y_train'\]"),
        (dict(x_train=np.zeros((12, 8, 8), np.float32)), r"x_train must be 4-D NHWC images \(N, H, W, C\), got shape \(12, 8, 8\)"),
        (dict(x_test=np.zeros((6, 8, 8, 3), np.float32)), r"same \(H, W, C\), got \(8, 8, 1\) and \(8, 8, 3\)"),
        (dict(y_train=np.zeros(5, np.int64)), r"y_train must be 1-D with one label per image \(12\), got shape \(5,\)"),
        (dict(y_test=np.full(6, 0.5)), "y_test must hold integer class labels, got dtype float64"),
        (dict(y_train=-np.ones(12, np.int64)), "y_train must hold class labels >= 0, got -1"),
    ],
)
def test_bad_npz_is_refused_with_a_message_that_says_what_is_expected(tmp_path, capsys, change, message):
    arrays = {k: v for k, v in {**good_arrays(), **change}.items() if v is not None}
    path = write_npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", path, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file_is_named(tmp_path, capsys):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(missing)
    with pytest.raises(SystemExit):
        main(["--data", missing])
    err = capsys.readouterr().err
    assert "nope.npz': no such file" in err and "x_train, y_train, x_test, y_test" in err


def test_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError, match="is not a readable .npz file"):
        load_npz(path)


def test_npz_loads_standardized_and_upscaled(tmp_path):
    path = write_npz(tmp_path / "data.npz", **good_arrays())
    data = load_npz(path, train_size=9, scale=2)
    assert data.x_train.shape == (9, 16, 16, 1) and data.x_test.shape == (6, 16, 16, 1)
    assert data.num_classes == 3 and sorted(np.bincount(data.y_train)) == [3, 3, 3]
    assert abs(float(data.x_train.mean())) < 1e-5 and float(data.x_train.std()) == pytest.approx(1, abs=1e-3)


def test_digits_split_is_balanced_and_holds_out_the_rest():
    data = load_digits(train_size=300, scale=2)
    assert data.x_train.shape == (300, 16, 16, 1) and data.x_test.shape == (1497, 16, 16, 1)
    assert np.bincount(data.y_train).tolist() == [30] * 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--keep-prob", "1.5"], r"--keep-prob must be in \[0, 1\], got 1.5"),
        (["--train-size", "5000"], r"train_size must be an int in \[10, 1787\].*got 5000"),
    ],
)
def test_bad_options_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "out")])
    assert re.search(message, capsys.readouterr().err)
