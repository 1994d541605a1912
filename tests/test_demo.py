"""python -m dropblock_jax.demo: the quick run's outputs, and clear errors for bad --data."""

import importlib
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dropblock_jax.demo import main
from dropblock_jax.demo.data import DataError, load_digits, load_npz, occlude, occlusion_corners
from dropblock_jax.demo.stats import mean_over_grid, paired_difference, t_quantile_975
from dropblock_jax.demo.train import METHODS, REGULARIZERS, InferenceDropBlock, StressTest, dropout, spatial_dropout
from dropblock_jax.models import resnet
from dropblock_jax.nnx import DropBlock
from helpers import expected_keep_fraction, layers_of, paper_gamma
from helpers import small_resnet as small

METHOD_NAMES = [m.name for m in METHODS]


@pytest.mark.launches
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
    for name in ("masks.png", "curves.png", "robustness.png"):
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
    check_stress_results(results, done.stdout)


def check_stress_results(results, stdout):
    """Every robustness, occlusion and paired number is there, finite and in range."""
    keeps = results["robustness"]["keep_probs"]
    assert keeps[0] == 1.0 and keeps == sorted(keeps, reverse=True) and results["robustness"]["block_sizes"] == [1, 3]
    assert results["occlusion"]["side"] == 8
    for name in METHOD_NAMES:
        for run in results["runs"][name]:
            assert 0.0 <= run["occlusion_accuracy"] <= 1.0
            assert sorted(run["robustness"]) == ["1", "3"]
            for curve in run["robustness"].values():
                assert len(curve) == len(keeps) and all(0.0 <= a <= 1.0 for a in curve)
                assert curve[0] == run["test_accuracy"]
        summary = results["summary"][name]
        for key in ("occlusion_mean", "occlusion_std", "area_b1_mean", "area_b3_mean"):
            assert np.isfinite(summary[key]) and 0.0 <= summary[key] <= 100.0, (name, key, summary[key])
    paired = results["paired"]["metrics"]
    assert sorted(paired) == ["area_b1", "area_b3", "clean", "occlusion"]
    for per_method in paired.values():
        assert list(per_method) == METHOD_NAMES[1:]
        for d in per_method.values():
            values = [d["lower"], d["mean"], d["upper"], *d["differences"]]
            assert all(np.isfinite(v) and -100.0 <= v <= 100.0 for v in values)
            assert d["lower"] <= d["mean"] <= d["upper"] and len(d["differences"]) == 2
            assert d["distinguishable"] == (d["lower"] > 0 or d["upper"] < 0)
    paper = results["paired_to_dropout"]["metrics"]
    assert sorted(paper) == sorted(paired) and list(paper["area_b3"]) == ["dropblock", "dropblock_scheduled"]
    assert "occluded" in stdout and "difference to none" in stdout and "difference to dropout" in stdout


def test_without_the_demo_extra_the_import_error_names_every_missing_package(monkeypatch):
    find_spec = importlib.util.find_spec
    absent = {"sklearn", "tqdm"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))
    for module in ("dropblock_jax.demo", "dropblock_jax.demo._requirements", "dropblock_jax.demo.cli"):
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=r"the demo needs scikit-learn, tqdm, which are not installed") as info:
        importlib.import_module("dropblock_jax.demo")
    # Quoted, so that zsh does not read the brackets.
    assert "pip install '.[demo]'" in str(info.value)


def test_t_quantiles_are_the_tables_and_continue_smoothly_past_it():
    assert [t_quantile_975(df) for df in (1, 2, 4, 10, 30)] == [12.7062, 4.3027, 2.7764, 2.2281, 2.0423]
    assert t_quantile_975(31) < t_quantile_975(30) and t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 60):
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("3", TypeError)):
        with pytest.raises(error, match=f"df must be an int >= 1, got {bad!r}"):
            t_quantile_975(bad)


def test_paired_difference_by_hand():
    # differences 1, 2, 3, 6: mean 3, sd sqrt(14/3), t_{0.975, 3} = 3.1824
    d = paired_difference([11.0, 12.0, 13.0, 16.0], [10.0, 10.0, 10.0, 10.0])
    half = 3.1824 * np.sqrt(14 / 3) / 2
    assert d["differences"] == [1.0, 2.0, 3.0, 6.0] and d["mean"] == 3.0
    assert d["lower"] == pytest.approx(3 - half) and d["upper"] == pytest.approx(3 + half)
    assert d["lower"] < 0 < d["upper"] and not d["distinguishable"]  # 3 - 3.44 < 0
    same = paired_difference([1.0, 2.0], [0.0, 1.0])  # the same difference every time
    assert (same["lower"], same["upper"], same["distinguishable"]) == (1.0, 1.0, True)
    assert not paired_difference([1.0, 2.0], [1.0, 2.0])["distinguishable"]


@pytest.mark.parametrize(
    ("values", "baseline", "message"),
    [
        ([1.0], [2.0], "at least 2 pairs, got 1"),
        ([1.0, 2.0], [1.0], r"equal length, got shapes \(2,\) and \(1,\)"),
        ([1.0, float("nan")], [1.0, 2.0], "must be finite"),
    ],
)
def test_paired_difference_refuses_bad_input(values, baseline, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(values, baseline)


def test_mean_over_grid_is_the_normalized_trapezoid_area():
    assert mean_over_grid([1.0, 0.5], [100.0, 50.0]) == pytest.approx(75.0)
    assert mean_over_grid([1.0, 0.9, 0.5], [90.0, 90.0, 90.0]) == pytest.approx(90.0)
    assert mean_over_grid([0.5, 0.75, 1.0], [50.0, 80.0, 90.0]) == mean_over_grid([1.0, 0.75, 0.5], [90.0, 80.0, 50.0])
    with pytest.raises(ValueError, match="strictly monotone"):
        mean_over_grid([1.0, 0.5, 0.7], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2 points"):
        mean_over_grid([1.0], [1.0])
    with pytest.raises(ValueError, match=r"one value per grid point \(2\)"):
        mean_over_grid([1.0, 0.5], [1.0, 2.0, 3.0])


def test_occlusion_replaces_exactly_one_square_per_image_and_repeats_for_a_seed():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(50, 16, 12, 2)).astype(np.float32) + 10.0  # never equal to the fill
    fill = np.asarray([-1.0, -2.0], np.float32)
    out = occlude(images, side=5, fill=fill, seed=3)
    corners = occlusion_corners(50, 16, 12, 5, seed=3)
    assert out.shape == images.shape and out.dtype == images.dtype
    for image, original, (row, col) in zip(out, images, corners):
        inside = np.zeros((16, 12), bool)
        inside[row : row + 5, col : col + 5] = True
        assert 0 <= row <= 11 and 0 <= col <= 7
        np.testing.assert_array_equal(image[inside], np.broadcast_to(fill, (25, 2)))
        np.testing.assert_array_equal(image[~inside], original[~inside])
    np.testing.assert_array_equal(occlude(images, 5, fill, seed=3), out)
    assert not np.array_equal(occlusion_corners(50, 16, 12, 5, seed=4), corners)
    assert len({tuple(c) for c in corners}) > 10  # the squares move around
    assert np.all(images > 5.0)  # the input is left alone


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(side=0), ValueError, r"side must be an int in \[1, 8\].*got 0"),
        (dict(side=9), ValueError, r"side must be an int in \[1, 8\].*got 9"),
        (dict(side=2.5), TypeError, r"side must be an int.*got 2.5"),
        (dict(fill=np.zeros(3)), ValueError, r"fill must be a scalar or one value per channel \(1\), got shape \(3,\)"),
        (dict(images=np.zeros((8, 8, 1))), ValueError, r"images must be 4-D NHWC.*got shape \(8, 8, 1\)"),
    ],
)
def test_occlusion_refuses_bad_arguments(kwargs, error, message):
    args = dict(images=np.zeros((2, 8, 8, 1), np.float32), side=4, fill=0.0) | kwargs
    with pytest.raises(error, match=message):
        occlude(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_probs=(0.9, 0.5)), r"keep_probs must start at 1.0 and fall strictly.*\(0.9, 0.5\)"),
        (dict(keep_probs=(1.0, 0.5, 0.7)), "keep_probs must start at 1.0 and fall strictly"),
        (dict(block_sizes=(0,)), r"block_sizes must be a non-empty tuple of ints >= 1, got \(0,\)"),
        (dict(block_sizes=()), r"block_sizes must be a non-empty tuple of ints >= 1, got \(\)"),
    ],
)
def test_stress_test_refuses_bad_settings(kwargs, message):
    args = dict(keep_probs=(1.0, 0.5), block_sizes=(1, 3), x_occluded=np.zeros((1, 8, 8, 1))) | kwargs
    with pytest.raises(ValueError, match=message):
        StressTest(**args)


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
        (
            dict(x_train=np.zeros((12, 8, 8), np.float32)),
            r"x_train must be 4-D NHWC images \(N, H, W, C\), got shape \(12, 8, 8\)",
        ),
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
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_npz(missing)
    with pytest.raises(SystemExit):
        main(["--data", missing])
    err = capsys.readouterr().err
    assert "nope.npz': no such file" in err and "x_train, y_train, x_test, y_test" in err


def test_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError, match=r"is not a readable \.npz file"):
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


# ----------------------------------------------------------------------------------------
# The comparison's regularizers at DropBlock's places, and DropBlock applied at inference.


def test_every_method_names_a_regularizer_of_the_comparison():
    assert {method.regularizer for method in METHODS} == set(REGULARIZERS)
    assert (REGULARIZERS["none"], REGULARIZERS["dropblock"]) == ("none", "dropblock")


@pytest.mark.parametrize(("regularizer", "broadcast_dims"), [(dropout, ()), (spatial_dropout, (1, 2))])
def test_dropout_variants_take_the_same_places_with_the_same_rates(regularizer, broadcast_dims):
    model = small(regularizer)
    dropouts = layers_of(model, nnx.Dropout)
    assert sorted(path[1:] for path in dropouts) == sorted(path[1:] for path in layers_of(small(), DropBlock))
    for path, layer in dropouts.items():
        assert layer.rate == pytest.approx(0.2 if path[1] == 2 else 0.05)
        assert tuple(layer.broadcast_dims) == broadcast_dims
    assert not layers_of(small("none"), nnx.Dropout) and not layers_of(small("none"), DropBlock)


def test_inference_dropblock_gives_every_regularizer_the_same_masks_and_is_off_at_keep_1():
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))

    @nnx.jit
    def forward(model, key, keep_prob):
        return model(x, perturb=InferenceDropBlock(key, keep_prob, block_size=3))

    outputs = {}
    for regularizer in ("none", dropout, spatial_dropout, "dropblock"):
        model = small(regularizer)  # same params: the regularizers hold none
        model.eval()
        # Compiled and op-by-op programs may round differently in the last bits; a dropped
        # block moves the logits by orders of magnitude more (checked at keep_prob 0.5).
        np.testing.assert_allclose(forward(model, jax.random.key(1), jnp.float32(1.0)), model(x), rtol=1e-5, atol=1e-6)
        outputs[regularizer] = forward(model, jax.random.key(1), jnp.float32(0.5))
        assert not np.allclose(outputs[regularizer], model(x), rtol=1e-3)
    # Each regularizer compiles its own program (same tolerance, same reason).
    for output in outputs.values():
        np.testing.assert_allclose(output, outputs["none"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward(model, jax.random.key(2), jnp.float32(0.5)), outputs["none"], rtol=1e-3)


def test_inference_dropblock_keeps_the_stage_ratio_unless_told_not_to():
    x = jnp.ones((64, 8, 8, 16))
    key = jax.random.key(0)
    for per_stage, expected in ((True, 1 - 0.5 / 4), (False, 0.5)):
        probe = InferenceDropBlock(key, 0.5, block_size=1, per_stage=per_stage, normalize="none")
        kept = float((probe(x, (1, 0, 0), stages_from_last=1) != 0).mean())
        assert kept == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_prob=1.5), r"keep_prob must be in \[0, 1\], got 1.5"),
        (dict(block_size=0), "block_size entries must be >= 1, got 0"),
        (dict(block_size=(3, -1)), r"block_size entries must be >= 1, got \(3, -1\)"),
    ],
)
def test_inference_dropblock_refuses_bad_arguments(kwargs, message):
    args = dict(key=jax.random.key(0), keep_prob=0.9) | kwargs
    with pytest.raises(ValueError, match=message):
        InferenceDropBlock(**args)
    with pytest.raises(TypeError, match="per_stage must be a bool, got 'yes'"):
        InferenceDropBlock(key=jax.random.key(0), keep_prob=0.9, per_stage="yes")


def test_inference_dropblock_perturbs_an_eval_resnet50_and_is_off_at_keep_1():
    model = resnet(50, 10, base_width=4, regularizer="none", rngs=nnx.Rngs(0))
    model.eval()
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    @nnx.jit
    def forward(model, keep_prob):
        return model(images, perturb=InferenceDropBlock(jax.random.key(1), keep_prob, block_size=2))

    np.testing.assert_allclose(forward(model, np.float32(1.0)), model(images), rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward(model, np.float32(0.5)), model(images), rtol=1e-3)


def test_inference_dropblock_gives_every_place_its_own_mask():
    # Ones in and no rescaling: the output is the mask. The places of one block (its
    # branch layers and its shortcut) and of different blocks all draw their own.
    x = jnp.ones((2, 8, 8, 4))
    probe = InferenceDropBlock(jax.random.key(0), 0.5, block_size=1, per_stage=False, normalize="none")
    places = [(stage, block, index) for stage in (0, 1) for block in (0, 1) for index in range(4)]
    masks = {place: np.asarray(probe(x, place, stages_from_last=0)) for place in places}
    for place, mask in masks.items():
        assert set(np.unique(mask)) == {0.0, 1.0}, place
        np.testing.assert_array_equal(probe(x, place, stages_from_last=0), mask)  # one place, one mask
    for first, second in itertools.combinations(places, 2):
        assert not np.array_equal(masks[first], masks[second]), (first, second)


@pytest.mark.parametrize("normalize", ["batch", "expected", "none"])
def test_inference_dropblock_rescales_what_it_keeps_as_its_normalize_says(normalize):
    x = jnp.ones((4, 8, 8, 2))
    key, place = jax.random.key(3), (1, 0, 2)
    dropped = np.asarray(InferenceDropBlock(key, 0.7, block_size=3, normalize=normalize)(x, place, stages_from_last=0))
    mask = np.asarray(InferenceDropBlock(key, 0.7, block_size=3, normalize="none")(x, place, stages_from_last=0))
    assert set(np.unique(mask)) == {0.0, 1.0}
    # "batch": the inverse of the kept fraction of the whole array; "expected": the inverse of
    # the expected kept fraction of an 8x8 map under the paper's gamma for 3x3 blocks.
    scale = {
        "batch": mask.size / mask.sum(),
        "expected": 1.0 / expected_keep_fraction(paper_gamma(0.7, (8, 8), 3), (8, 8), 3),
        "none": 1.0,
    }[normalize]
    np.testing.assert_allclose(dropped, mask * scale, rtol=1e-6)
