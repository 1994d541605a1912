"""Two processes x two CPU devices, as the hosts of a pod slice: the one-process bits on every shard.

All checks of one launch live in ``tests/_multihost_worker.py``, so the two processes
pay their start-up and ``jax.distributed`` initialization once; each prints its results
as JSON and the tests here assert on both. ``examples/train.py --simulate-hosts 2`` is
launched once more, as a user would. Run these alone with ``pytest -m multihost``.
"""

import contextlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile

import pytest

from helpers import python_path_environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_multihost_worker.py"
TRAIN = ROOT / "examples" / "train.py"
PROCESSES = 2
# Both processes compile every check's programs side by side; minutes only on a machine
# that is busy with something else.
TIMEOUT_S = 600

pytestmark = [pytest.mark.multihost, pytest.mark.launches]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _environment(devices_per_process: int) -> dict:
    # The worker imports examples/train.py and its imagenet.pod, as the tests do.
    env = python_path_environment(JAX_PLATFORMS="cpu")
    # The conftest's --xla_backend_optimization_level=0 (in os.environ) is kept.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}"
    return env


def _outputs(logs) -> str:
    text = []
    for index, (out, err) in enumerate(logs):
        out.seek(0)
        err.seek(0)
        text.append(f"--- process {index} stdout ---\n{out.read()[-5000:]}\n--- process {index} stderr ---\n")
        text.append(err.read()[-5000:])
    return "\n".join(text)


def run_processes(commands: list[list[str]], env: dict, timeout: float) -> list[str]:
    """Runs the commands side by side; their stdouts, or a failure showing every process's output.

    A process that fails or outlives ``timeout`` fails the test; the others are killed
    then, not left waiting for a peer that will not come.
    """
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as files:
        logs = [
            (files.enter_context(open(f"{folder}/{i}.out", "w+")), files.enter_context(open(f"{folder}/{i}.err", "w+")))
            for i in range(len(commands))
        ]
        children = [
            subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
            for command, (out, err) in zip(commands, logs)
        ]
        failure = None
        try:
            for child in children:
                child.wait(timeout=timeout)
                if child.returncode != 0:
                    failure = f"a process exited with status {child.returncode}"
                    break
        except subprocess.TimeoutExpired:
            failure = f"the processes did not finish within {timeout} s"
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        if failure is not None:
            pytest.fail(f"{failure}\n{_outputs(logs)}")
        for out, _ in logs:
            out.seek(0)
        return [out.read() for out, _ in logs]


@pytest.fixture(scope="module")
def results():
    port = str(_free_port())
    commands = [[sys.executable, "-W", "error", str(WORKER), port, str(i)] for i in range(PROCESSES)]
    stdouts = run_processes(commands, _environment(2), TIMEOUT_S)
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout in stdouts]


def _check(results, name):
    for process in results:
        assert "error" not in process[name], process[name].get("error")
    return [process[name] for process in results]


def test_two_processes_of_two_devices(results):
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)


def test_drop_block_on_a_global_batch_equals_one_process_on_every_shard(results):
    for process in _check(results, "check_drop_block_on_a_global_batch"):
        cases = process["cases"]
        assert set(cases) == {
            f"{normalize}/{layout}"
            for normalize in ("batch", "expected")
            for layout in ("per_channel", "shared", "batch_shared")
        }
        for name, case in cases.items():
            assert case["global_shape"] == [32, 14, 14, 64], name
            assert case["shards_equal"] == [True, True], name
            assert 0.05 < case["dropped_fraction"] < 0.5, name


def test_across_processes_batch_all_reduces_scalars_and_expected_nothing(results):
    for process in _check(results, "check_drop_block_on_a_global_batch"):
        batch, expected = process["programs"]["batch"], process["programs"]["expected"]
        assert batch["forbidden"] == expected["forbidden"] == 0
        assert expected["all_reduce_shapes"] == []
        assert batch["all_reduce_shapes"], "the kept counts are summed across processes"
        for shape in batch["all_reduce_shapes"]:
            parts = [part.strip() for part in shape.strip("()").split(",")]
            assert all(part.split("{")[0].endswith("[]") for part in parts), shape


def test_shard_map_over_both_processes_scales_by_the_global_kept_count(results):
    for process in _check(results, "check_shard_map_across_processes"):
        assert process["output_shards_equal_global_scale"] == [True, True]
        # Otherwise the global and the per-device normalizations could not be told apart.
        assert process["local_scales_differ_from_global"]
        assert 0.5 < process["kept_fraction"] < 0.95


def test_shard_map_device_keys_from_fold_in_give_distinct_masks(results):
    for process in _check(results, "check_shard_map_across_processes"):
        assert process["mask_shards_equal_per_device_keys"] == [True, True]
        assert process["distinct_device_masks"] == [True] * 6


@pytest.mark.parametrize("layer", ["nnx_resnet", "linen", "equinox"])
def test_data_parallel_train_step_equals_one_process(results, layer):
    for process in _check(results, f"check_{layer}_train_step"):
        # Two steps at the keep_probs 0.9 and 0.8 of a schedule: one trace of the step.
        assert process["traces"] == 1
        assert [round(step["keep_prob"], 6) for step in process["steps"]] == [0.9, 0.8]
        for step in process["steps"]:
            assert step["keep_prob"] == step["keep_prob_one_process"]
            for name, equal in step["mask_shards_equal"].items():
                assert equal == [True, True], name
            for name, kept in step["kept_fraction"].items():
                assert 0.5 < kept < 1.0, name
            # The forward pass is per sample, but the loss's mean and the gradient's sum
            # (and the ResNet's batch norm) add across devices in another order: float32
            # round-off, after the first step in the parameters too.
            assert abs(step["loss"] - step["loss_one_process"]) <= 1e-6 * abs(step["loss_one_process"])


# Process 1 of the pair reaches its first step LATE_S seconds after process 0, as a host
# still compiling does: past gloo's fixed 30 s for joining a program's collectives, which
# only pod.compiled_together's wait lets process 0 survive.
LATE_S = 35
LATE_PROCESS_1 = f"""
import builtins, sys, time

if "--process-id" in sys.argv and sys.argv[sys.argv.index("--process-id") + 1] == "1":
    _import = builtins.__import__

    def _delay_first_batch(name, *args, **kwargs):
        module = _import(name, *args, **kwargs)
        pod = sys.modules.get("imagenet.pod")
        if hasattr(pod, "global_batch") and not hasattr(pod, "_late"):
            original = pod.global_batch

            def late(*a, **k):
                if not pod._late:
                    pod._late.append(time.sleep({LATE_S}))
                return original(*a, **k)

            pod._late, pod.global_batch = [], late
        return module

    builtins.__import__ = _delay_first_batch
"""


def test_train_example_on_two_simulated_hosts_logs_and_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(LATE_PROCESS_1)
    result = subprocess.run(
        [
            *(sys.executable, "-W", "error", TRAIN, "--simulate-hosts", "2", "--steps", "3", "--widths", "4,8"),
            *("--global-batch", "16", "--log-every", "1", "--checkpoint-every", "2"),
            *("--checkpoint-dir", checkpoints, "--timeout", str(TIMEOUT_S)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path / "site")},
        cwd=ROOT,
        timeout=TIMEOUT_S + 60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # gloo reports its connections on the same stdout, from both processes: the script's
    # lines are found by their form.
    assert "2 process(es), 4 device(s), global batch 16 (8 rows read by each process)" in result.stdout
    # Only process 0 logs: one line a step, with the loss and the kept fraction of every place.
    steps = re.findall(r"^step +(\d+) loss (\S+) keep_prob (\S+) kept: (.*)$", result.stdout, flags=re.MULTILINE)
    assert [step for step, *_ in steps] == ["1", "2", "3"], result.stdout
    places = [f"stage{s}/block0/{name}" for s in (0, 1) for name in ("drop1", "drop2", "shortcut_drop")]
    for _, loss, keep_prob, kept in steps:
        assert float(loss) > 0 and 0.5 < float(keep_prob) <= 1.0
        kept = dict(word.split("=") for word in kept.split())
        assert list(kept) == places, kept
        assert all(0.5 < float(value) <= 1.0 for value in kept.values()), kept
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "3"]
