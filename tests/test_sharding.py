"""Multi-device behaviour: sharded jit, collectives in the compiled program, shard_map keys.

The checks need 4 devices, which a process must ask for before JAX starts, so they all
run once in a subprocess (``tests/_sharding_checks.py``) under
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; each test here asserts on its
part of the JSON that process prints.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("_sharding_checks.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    # The LLVM backend level changes neither the HLO nor the collectives; level 0 makes the
    # CPU compiles several times faster, which keeps this module short.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(results, name):
    result = results[name]
    assert "error" not in result, result.get("error")
    return result


def test_runs_on_four_devices(results):
    assert results["device_count"] == 4


def test_hlo_parser_sees_gathers_and_vector_all_reduces(results):
    result = _check(results, "check_hlo_parser_control")
    assert result["all_gather_found"] >= 1
    assert result["vector_all_reduce_scalar"] and not any(result["vector_all_reduce_scalar"])


def test_sharded_jit_equals_one_device_bit_for_bit(results):
    cases = _check(results, "check_sharded_equals_one_device")["cases"]
    assert len(cases) == 27
    for name, case in cases.items():
        assert case["input_shards"] == 4, name
        assert case["bitwise_equal"], name
        assert case["output_sharding_kept"], name
        assert 0.01 < case["dropped_fraction"] < 0.5, name


def test_no_activation_sized_collectives(results):
    programs = _check(results, "check_sharded_equals_one_device")["programs"]
    assert len(programs) == 6
    for name, program in programs.items():
        assert program["forbidden"] == {
            "all-gather": 0,
            "all-to-all": 0,
            "collective-permute": 0,
            "reduce-scatter": 0,
        }, name


def test_expected_normalization_has_no_collective_at_all(results):
    programs = _check(results, "check_sharded_equals_one_device")["programs"]
    for layout in ("batch", "batch_explicit", "batch_channels"):
        assert programs[f"expected/{layout}"]["all_reduce_shapes"] == [], layout


def test_batch_normalization_all_reduces_only_scalars(results):
    programs = _check(results, "check_sharded_equals_one_device")["programs"]
    for layout in ("batch", "batch_explicit", "batch_channels"):
        program = programs[f"batch/{layout}"]
        # The kept counts are summed across the batch shards: an all-reduce, of scalars only.
        assert program["all_reduce_shapes"], layout
        assert all(program["all_reduce_scalar"]), (layout, program["all_reduce_shapes"])


def test_arrays_past_2_to_the_31_units_shard_without_activation_sized_collectives(results):
    programs = _check(results, "check_past_2_to_the_31_units")["programs"]
    assert len(programs) == 9
    for name, program in programs.items():
        assert not any(program["forbidden"].values()), (name, program["forbidden"])
        assert all(program["all_reduce_scalar"]), name
        assert bool(program["all_reduce_scalar"]) == name.startswith("batch"), name


def test_shard_map_axis_name_gives_the_global_batch_normalization(results):
    result = _check(results, "check_shard_map_batch_normalization")
    assert result["same_mask_both_ways"]
    assert result["global_bitwise_equal"], result["global_max_abs_diff"]
    assert result["local_scales_differ"]
    assert result["without_axis_name_is_local"]
    assert result["without_axis_name_differs_from_global"]


@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_masks_repeat_across_devices_without_fold_in_and_differ_with_it(results, transform):
    result = _check(results, "check_per_device_keys")
    assert result[f"{transform}/fold_in=False"]["equal_pairs"] == [True] * 6
    assert result[f"{transform}/fold_in=True"]["equal_pairs"] == [False] * 6
    for fold in (False, True):
        assert 0.2 < result[f"{transform}/fold_in={fold}"]["kept_fraction"] < 0.9


def test_pmap_axis_name_gives_the_global_batch_normalization(results):
    result = _check(results, "check_per_device_keys")
    assert result["pmap/fold_in=False"]["global_bitwise_equal"]
    assert result["pmap/fold_in=True"]["global_bitwise_equal"]


def test_data_parallel_training_step_matches_one_device(results):
    result = _check(results, "check_data_parallel_training_step")
    assert result["finite"]
    assert result["dropped_shards"] == 4
    assert result["dropped_shape"] == [8, 12, 12, 8]
    assert result["mask_bitwise_equal"]
    assert result["dropped_max_abs_diff"] == 0.0
    # The forward pass is per sample and bit-identical; only the gradient's cross-device
    # sum is reordered, so losses and parameters agree to float32 round-off, far below
    # the parameter update itself (Adam, lr 1e-2).
    assert abs(result["loss_one"] - result["loss_sharded"]) <= 1e-6 * abs(result["loss_one"])
    assert result["param_max_abs_diff"] <= 1e-6
    assert result["param_min_step"] > 1e-3


def test_nnx_set_keep_prob_on_explicit_and_auto_meshes_keeps_each_sharding_and_compiles_nothing_new(results):
    cases = _check(results, "check_nnx_set_keep_prob_on_meshes")
    assert len(cases) == 8
    for name, case in cases.items():
        assert "error" not in case, (name, case.get("error"))
        # The plain layer and the stack made with nnx.vmap.
        assert case["count"] == 2, name
        assert case["stack_sharded"] == ("/sharded/" in name), name
        assert case["eager"] == {"values": True, "shardings_kept": True}, name
        assert case["jitted"] == {"values": True, "shardings_kept": True}, name
        assert case["traces"] == 1, name
        assert case["compiles"] == case["baseline_compiles"], name
        # Each value reached the layer: keep_prob 0.7, 0.6, 0.5 on 8x8 maps drop some units, not all.
        assert all(0.05 < fraction < 0.9 for fraction in case["dropped_fractions"]), name
