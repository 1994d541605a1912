"""``examples/imagenet`` survives what stops runs: a SIGKILL mid-save, hosts with other data, SIGTERM to workers.

- **SIGKILL**: a run of 6 steps, checkpoints every 2, is killed (the whole process
  group: a host lost, the OOM killer) as a save starts (its temporary directory
  created, nothing in it), then, rerun, as a save ends (every file written, the
  temporary directory not yet renamed: the commit), then rerun to the end. The kills are
  made by the launched process itself at those file operations (``os.mkdir``,
  ``os.rename``, which orbax's local saves go through), through a ``sitecustomize``
  this module puts on the processes' ``PYTHONPATH``: the moments are exact whatever the
  machine's speed. Each rerun must start from the last complete checkpoint (nothing
  lost but the steps after it), step over the half-written directory without restoring
  it, and the last one must end bit-equal to an unbroken run. One process and a narrow
  ResNet-18: orbax's commit protocol does not depend on the network or, on one
  machine, on the number of processes (a pod's hosts each write their part and
  process 0 commits; a bucket has no rename and commits with a marker file, which only
  a real bucket under a kill shows).
- **Hosts whose data differ**: two processes joined with ``--coordinator``, each in its
  own working directory whose relative ``imagenet`` holds its "disk": one complete, one
  half copied (a shard missing) and prepared from another class list. Both stop at
  start and name the host and what differs.
- **SIGTERM with data workers**: Grain's worker processes, started as the trainer
  starts them, keep delivering batches after a SIGTERM sent to the whole process group.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import (
    IMAGENET_EXAMPLE,
    compilation_cache,
    free_port,
    imagenet_trainer,
    launch_environment,
    prepared_imagenet,
    python_path_environment,
    running,
)

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

STEPS = 6
TIMEOUT_S = 600

# Kills the run's whole process group at a file operation named by KILL_RUN_AT: "mkdir:REGEX" once
# the directory is made, "rename:REGEX" before the renaming (matched against the new path). Python
# imports sitecustomize at start-up.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    import re
    import signal

    _RULE = os.environ.get("KILL_RUN_AT")
    if _RULE:
        _OPERATION, _PATTERN = _RULE.split(":", 1)

        def _kill_if(operation, path):
            if operation == _OPERATION and re.search(_PATTERN, os.fspath(path)):
                os.killpg(os.getpgrp(), signal.SIGKILL)

        _mkdir, _rename = os.mkdir, os.rename

        def _made(path, *args, **kwargs):
            _mkdir(path, *args, **kwargs)
            _kill_if("mkdir", path)

        def _renaming(source, destination, *args, **kwargs):
            _kill_if("rename", destination)
            _rename(source, destination, *args, **kwargs)

        os.mkdir, os.rename = _made, _renaming
    """
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_imagenet(tmp_path_factory)


def _command(workdir, data_dir, *extra):
    return [
        *(sys.executable, IMAGENET_EXAMPLE / "train.py", "--config", IMAGENET_EXAMPLE / "configs" / "cpu.py"),
        *("--workdir", workdir, f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}"),
        *("--config.model_depth=18", "--config.regularizer=none", "--config.checkpoint_every_steps=2"),
        *("--config.eval_every_steps=0", "--config.debug_dumps=True", *extra),
    ]


def _run(command, env, log_path, cwd):
    with open(log_path, "w") as log, running(command, log, env, cwd) as child:
        child.wait(timeout=TIMEOUT_S)
    return child.returncode, log_path.read_text()


def _committed(checkpoints):
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _partial(checkpoints):
    """The directories of saves not committed."""
    return sorted(p.name for p in checkpoints.iterdir() if not p.name.isdigit())


@pytest.fixture(scope="module")
def killed_runs(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("killed")
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = launch_environment(compilation_cache(tmp_path_factory), PYTHONPATH=str(hooks))
    found = {}
    code, found["unbroken_text"] = _run(_command(base / "unbroken", data), env, base / "unbroken.log", base)
    assert code == 0, found["unbroken_text"][-8000:]
    workdir = base / "killed"
    checkpoints = workdir / "checkpoints"
    moments = {
        # A save starts: its temporary directory exists, nothing is in it.
        "start_of_save_4": "mkdir:checkpoints/4\\.orbax-checkpoint-tmp$",
        # A save ends: everything written, not yet renamed to its step.
        "commit_of_save_6": "rename:checkpoints/6$",
    }
    for moment, rule in moments.items():
        code, text = _run(_command(workdir, data), dict(env, KILL_RUN_AT=rule), base / f"{moment}.log", base)
        # What the kill left: the complete checkpoints, and what each uncommitted one holds.
        partial = {name: sorted(p.name for p in (checkpoints / name).iterdir()) for name in _partial(checkpoints)}
        found[moment] = {"code": code, "text": text, "committed": _committed(checkpoints), "partial": partial}
    code, found["final_text"] = _run(_command(workdir, data), env, base / "final.log", base)
    assert code == 0, found["final_text"][-8000:]
    found["unbroken"], found["killed"] = base / "unbroken", workdir
    return found


def _first_step(text):
    """The first step a launch trains, from its first line ("... steps FIRST..LAST of N")."""
    line = next(line for line in text.splitlines() if "process(es)" in line)
    return int(line.rsplit("steps ", 1)[1].split("..")[0])


@pytest.mark.multihost
def test_each_kill_lands_inside_a_save(killed_runs):
    start, commit = killed_runs["start_of_save_4"], killed_runs["commit_of_save_6"]
    assert start["code"] == commit["code"] == -signal.SIGKILL
    # Killed as save 4 began: only 2 is complete; 4's directory is there, empty.
    assert start["committed"] == [2] and start["partial"] == {"4.orbax-checkpoint-tmp": []}
    # Killed at save 6's commit: 2 and 4 complete, 6 written in full (its item renamed into
    # place: "default") under its temporary name.
    assert commit["committed"] == [2, 4] and list(commit["partial"]) == ["6.orbax-checkpoint-tmp"]
    assert "default" in commit["partial"]["6.orbax-checkpoint-tmp"]


@pytest.mark.multihost
def test_a_rerun_resumes_from_the_last_complete_checkpoint_and_never_a_partial_one(killed_runs):
    # Steps 3 and 4 (killed during save 4), then 5 and 6 (killed during save 6) are all that is lost.
    assert _first_step(killed_runs["commit_of_save_6"]["text"]) == 2
    assert _first_step(killed_runs["final_text"]) == 4
    assert _committed(killed_runs["killed"] / "checkpoints") == [4, 6]
    assert _partial(killed_runs["killed"] / "checkpoints") == []


@pytest.mark.multihost
def test_after_the_kills_the_run_ends_bit_equal_to_an_unbroken_run(killed_runs):
    unbroken, killed = killed_runs["unbroken"], killed_runs["killed"]

    def lines(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    # Every step once, the steps redone after each kill replaced, the same numbers bit for bit.
    keys = ("step", "loss", "learning_rate", "keep_prob")
    assert [[m[k] for k in keys if k in m] for m in lines(killed / "metrics.jsonl") if "loss" in m] == [
        [m[k] for k in keys if k in m] for m in lines(unbroken / "metrics.jsonl") if "loss" in m
    ]
    assert [m for m in lines(killed / "metrics.jsonl") if "top1" in m] == [
        m for m in lines(unbroken / "metrics.jsonl") if "top1" in m
    ]
    name = "debug/train_records.process0.jsonl"
    assert (killed / name).read_text() == (unbroken / name).read_text()
    a, b = (np.load(folder / "debug" / f"eval_step{STEPS}.npz") for folder in (unbroken, killed))
    assert np.array_equal(a["logits"], b["logits"])


# ----------------------------------------------------------------------------------------
# Hosts whose data directories differ.


@pytest.mark.multihost
def test_hosts_with_different_data_stop_at_start_naming_the_host_and_what_differs(data, tmp_path, tmp_path_factory):
    disks = [tmp_path / "host0", tmp_path / "host1"]
    for disk in disks:
        shutil.copytree(data, disk / "imagenet")
    # Host 1: a train shard not copied, and an info.json prepared from another class list.
    (disks[1] / "imagenet" / "train-00002-of-00003.array_record").unlink()
    info = json.loads((data / "info.json").read_text())
    info["classes"] = [*info["classes"][:-1], "n99999999"]
    (disks[1] / "imagenet" / "info.json").write_text(json.dumps(info))
    expected_train = info["train"]
    env = launch_environment(compilation_cache(tmp_path_factory))
    port = free_port()
    children, logs = [], []
    for process, disk in enumerate(disks):
        command = _command(disk / "workdir", "imagenet", "--coordinator", f"localhost:{port}")
        command += ["--num-processes", "2", "--process-id", str(process)]
        logs.append(open(disk / "log", "w"))  # noqa: SIM115 (closed below)
        children.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=disk))
    try:
        codes = [child.wait(timeout=TIMEOUT_S) for child in children]
    finally:
        for child, log in zip(children, logs):
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()
    texts = [(disk / "log").read_text() for disk in disks]
    for code, text in zip(codes, texts):
        assert code != 0, text[-4000:]
        assert "The hosts disagree about config.data_dir=imagenet" in text, text[-4000:]
        assert "process 1 (" in text and "info.json classes (CRC-32)" in text, text[-4000:]
        # The missing shard: host 1 holds fewer train records than host 0's 35.
        assert re.search(rf"train records in the shards \d+ where process 0 has {expected_train}\b", text), text[-4000:]
        assert "process(es)" not in text  # stopped before training
    assert not (disks[0] / "workdir" / "checkpoints").exists()


def test_a_data_dir_holding_other_records_than_its_info_says_stops_the_run(data, tmp_path):
    trainer = imagenet_trainer()
    info = json.loads((data / "info.json").read_text())
    # A val shard missing: fewer records than info.json counts.
    missing = tmp_path / "missing"
    shutil.copytree(data, missing)
    (missing / "val-00001-of-00002.array_record").unlink()
    held = len(trainer.input_pipeline.record_source(missing, "val"))
    message = rf"info\.json counts {info['val']} val records, its val-\*\.array_record shards hold {held}, 0 shard"
    with pytest.raises(ValueError, match=message):
        trainer.check_data(str(missing), info)
    # A train shard cut short, as by an interrupted copy: it cannot be read.
    cut = tmp_path / "cut"
    shutil.copytree(data, cut)
    shard = cut / "train-00001-of-00003.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"train-\*\.array_record shards hold \d+, 1 shard\(s\) cannot be read"):
        trainer.check_data(str(cut), info)
    # A complete copy passes.
    trainer.check_data(str(data), info)


# ----------------------------------------------------------------------------------------
# SIGTERM and Grain's worker processes.

WORKERS_AFTER_SIGTERM = textwrap.dedent(
    """
    import os, signal, sys
    from absl import flags
    from helpers import imagenet_trainer
    flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    train = imagenet_trainer()
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    dataset = train.input_pipeline.train_batches(
        {data!r}, seed=0, process_index=0, process_count=1, local_batch=2, image_size=16,
        crop_fraction=0.875, threads=1, workers=1,
    )
    batches = train.batches_from(dataset, workers=1)
    next(batches)
    os.killpg(0, signal.SIGTERM)  # every process of the group, as a preempted machine's
    records = [int(next(batches)["record"][0]) for _ in range(40)]
    print("SIGTERM received", len(received), "batches after it", len(records))
    """
)


def test_data_workers_keep_delivering_after_a_sigterm_to_every_process(data, tmp_path):
    script = WORKERS_AFTER_SIGTERM.format(data=str(data))
    env = python_path_environment(JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, start_new_session=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "SIGTERM received 1 batches after it 40" in result.stdout
