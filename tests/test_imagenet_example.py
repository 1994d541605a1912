"""``examples/imagenet``: prepare a tiny ImageNet folder, train ResNet-50 on two simulated hosts, resume after SIGTERM.

A few dozen random JPEGs (mixed sizes and aspect ratios, one grayscale, seven wnids;
13 val images, an odd count) go through ``prepare.py``; ``train.py`` then runs
``configs/cpu.py`` (ResNet-50's structure at width 8, 32-pixel images) with
``--simulate-hosts 2`` three times, as a user would: once unbroken in a local work
directory, once in a work directory in a bucket (``gs://``, a Cloud Storage server on
localhost) with a data worker process, sent SIGTERM at a known step, and once more in
that work directory, to the end. The SIGTERM goes to every process of the run, as a
preempted VM's does, while process 0 waits for the bucket to take its step-1 metrics; the
bucket takes them once JAX's preemption service has logged the step the processes agreed
to stop after, so that the run stops one or two steps after the signal whatever the
machine's speed, with 5 steps or more left.
The three launches share one persistent compilation cache, so the later two load the
programs the first compiled. The expected values come from the source folder and from
NumPy recounts, not from the code under test.
"""

import io
import json
import os
import pathlib
import re
import signal
import sys
import time

import input_pipeline
import numpy as np
import prepare
import pytest

from helpers import (
    IMAGENET_EXAMPLE,
    ROOT,
    TRAIN_PER_CLASS,
    VAL_IMAGES,
    WNIDS,
    Bucket,
    compilation_cache,
    imagenet_trainer,
    launch_environment,
    learning_rate_by_the_authors_rule,
    prepared_imagenet,
    running,
    tiny_imagenet,
    write_jpeg,
)

EXAMPLE = IMAGENET_EXAMPLE
# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

trainer = imagenet_trainer()

STEPS = 8
# Two processes of two CPU devices, two rows each: 4 rows a process, 8 a step.
GLOBAL_BATCH = 8
PROCESSES = 2
TIMEOUT_S = 600
# The step whose metrics upload brings the SIGTERM.
SIGTERM_STEP = 1
# What JAX's preemption service logs (at INFO, in each process) once the processes have agreed
# on the loop index to stop after: the largest index any of them had reached, plus one.
SYNC_POINT = re.compile(r"Preemption sync counter is set: (\d+)")


# ----------------------------------------------------------------------------------------
# The tiny ImageNet, prepared.


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_imagenet(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_imagenet(tmp_path_factory)


def _records(data_dir, split):
    source = input_pipeline.record_source(data_dir, split)
    return [input_pipeline.decode_record(source[i]) for i in range(len(source))]


def test_prepare_writes_every_image_once_with_its_sorted_wnid_label(source, data):
    info = json.loads((data / "info.json").read_text())
    assert info["classes"] == sorted(WNIDS)
    assert (info["train"], info["val"]) == (len(WNIDS) * TRAIN_PER_CLASS, VAL_IMAGES)
    for split in ("train", "val"):
        expected = sorted(
            (sorted(WNIDS).index(path.parent.name), path.read_bytes()) for path in (source / split).glob("*/*.JPEG")
        )
        written = _records(data, split)
        assert sorted(written) == expected
        # Written in a shuffled order, so that a host's contiguous slice holds many classes.
        assert [label for label, _ in written] != sorted(label for label, _ in written)
    assert len(list(data.glob("train-*-of-00003.array_record"))) == 3


def test_prepare_names_a_missing_split_folder(source, tmp_path):
    (tmp_path / "train" / WNIDS[0]).mkdir(parents=True)
    write_jpeg(tmp_path / "train" / WNIDS[0] / "a.JPEG", np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match=r"val is not a folder \(expected val/<wnid>/\*\.JPEG"):
        prepare.prepare(tmp_path, tmp_path / "out", 1, 1, 0, 1)
    (tmp_path / "val" / "n99999999").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folders that train/ does not have: \\['n99999999'\\]"):
        prepare.list_split(tmp_path / "val", [WNIDS[0]])


# ----------------------------------------------------------------------------------------
# The three launches.


def _train_command(workdir, data_dir, *extra):
    return [
        *(sys.executable, EXAMPLE / "train.py", "--config", EXAMPLE / "configs" / "cpu.py", "--workdir", workdir),
        *(f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}", "--config.eval_every_steps=4"),
        *("--config.debug_dumps=True", "--simulate-hosts", str(PROCESSES)),
        *("--timeout", str(TIMEOUT_S), *extra),
    ]


def _wait_for(condition):
    """Whether ``condition()`` turned true within the launches' time limit (checked every 0.1 s)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _finish(child, log):
    child.wait(timeout=TIMEOUT_S + 60)
    text = pathlib.Path(log.name).read_text()
    assert child.returncode == 0, text[-8000:]
    return text


def _metrics(text):
    return [json.loads(line) for line in text.splitlines()]


def _step_dirs(names):
    """The steps of the checkpoint directories among object or file names."""
    return sorted({int(name.split("/")[0]) for name in names if name.split("/")[0].isdigit()})


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    with Bucket(tmp_path_factory.mktemp("bucket")) as bucket:
        yield bucket


@pytest.fixture(scope="module")
def runs(data, bucket, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    env = launch_environment(compilation_cache(tmp_path_factory), **bucket.environment())
    # The launches' working directory: nothing may land there (a URL taken for a path would).
    cwd = base / "cwd"
    cwd.mkdir()
    unbroken = base / "unbroken"
    with open(base / "unbroken.log", "w") as log:
        # Checkpoints every 2 steps, and one traced step (jax.profiler) after the first.
        extra = ("--config.checkpoint_every_steps=2", "--config.profile_first_step=1", "--config.profile_steps=1")
        with running(_train_command(unbroken, data, *extra), log, env, cwd) as child:
            unbroken_text = _finish(child, log)
    # No checkpoint interval within the run: the stopped run's only checkpoint is the SIGTERM's.
    # One evaluation, at the end (the unbroken run has checked the interval).
    no_interval = ("--config.checkpoint_every_steps=100", "--config.eval_every_steps=0")
    preempted = bucket.uri("preempted")
    preempted_log = base / "preempted.log"
    # The C++ side's INFO lines too (JAX shows its warnings only): the preemption service's sync point.
    preempted_env = env | {"TF_CPP_MIN_LOG_LEVEL": "0"}
    with open(preempted_log, "w") as log:
        # A data worker process a host, which the SIGTERM reaches too; one batch prefetched to the devices.
        workers = ("--config.data_workers=1", "--config.prefetch_batches=1")
        with running(_train_command(preempted, data, *no_interval, *workers), log, preempted_env, cwd) as child:
            sent, agreed = [], []

            def preempt(path, body):
                # gcsfs uploads metrics.jsonl whole: the upload holding step 1's line is the one.
                if f'{{"step": {SIGTERM_STEP}, "loss"'.encode() in body and not sent:
                    sent.append(SIGTERM_STEP)
                    os.killpg(child.pid, signal.SIGTERM)
                    # Process 0 waits here for its upload, and process 1 for process 0 within a step,
                    # until both have logged the agreed sync point: JAX's service looks for SIGTERM
                    # once a second, time in which a fast machine would run every step left.
                    agreed.append(_wait_for(lambda: len(SYNC_POINT.findall(preempted_log.read_text())) == PROCESSES))

            bucket.on_upload = preempt
            try:
                stopped_text = _finish(child, log)
            finally:
                bucket.on_upload = None
    assert sent, "process 0 never uploaded the metrics of step 1"
    assert agreed == [True], f"the processes logged no preemption sync point within {TIMEOUT_S} s"
    stopped_metrics = _metrics(bucket.read("preempted/metrics.jsonl").decode())
    stopped_checkpoints = _step_dirs(bucket.names("preempted/checkpoints"))
    with (
        open(base / "resumed.log", "w") as log,
        running(_train_command(preempted, data, *no_interval), log, env, cwd) as child,
    ):
        resumed_text = _finish(child, log)
    return {
        "cwd": cwd,
        "unbroken": unbroken,
        "unbroken_text": unbroken_text,
        "stopped_text": stopped_text,
        "sync_points": [int(point) for point in SYNC_POINT.findall(stopped_text)],
        "stopped_metrics": stopped_metrics,
        "stopped_checkpoints": stopped_checkpoints,
        "resumed_text": resumed_text,
    }


def _unbroken_metrics(runs):
    return _metrics((runs["unbroken"] / "metrics.jsonl").read_text())


def _train_lines(metrics):
    return [m for m in metrics if "loss" in m]


def _eval_lines(metrics):
    return [m for m in metrics if "top1" in m]


@pytest.mark.multihost
def test_metrics_hold_what_is_promised_written_once(runs):
    metrics = _unbroken_metrics(runs)
    train = _train_lines(metrics)
    # log_every_steps=1: one line a step, from process 0 only.
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    for m in train:
        assert set(m) == {
            *("step", "loss", "learning_rate", "keep_prob", "images_per_second_per_device", "input_wait_fraction"),
            "epoch",
        }
        assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["images_per_second_per_device"] > 0
        assert 0 <= m["input_wait_fraction"] <= 1
    evals = _eval_lines(metrics)
    assert [m["step"] for m in evals] == [4, 8]
    for m in evals:
        assert set(m) == {"step", "top1", "top5", "eval_images"}
        assert m["eval_images"] == VAL_IMAGES
    events = list((runs["unbroken"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    content = events[0].read_bytes()
    for tag in (b"loss", b"learning_rate", b"keep_prob", b"top1", b"top5", b"eval_images"):
        assert tag in content, tag
    assert list((runs["unbroken"] / "profile").rglob("*.xplane.pb"))
    # checkpoint_every_steps=2 over 8 steps, the last two kept.
    assert _step_dirs(p.name for p in (runs["unbroken"] / "checkpoints").iterdir()) == [6, 8]


def _cpu_config():
    from configs import cpu

    return cpu.get_config()


@pytest.mark.multihost
def test_the_logged_schedules_are_the_recipe_written_out(runs):
    config = _cpu_config()
    train = _train_lines(_unbroken_metrics(runs))
    rule = {"records": len(WNIDS) * TRAIN_PER_CLASS, "batch": GLOBAL_BATCH, "steps": STEPS, "factor": 0.1}
    rule |= {"warmup": config.warmup_epochs, "decays": config.lr_decay_epochs, "base": 0.1}
    rule |= {"schedule_epochs": config.lr_schedule_epochs}
    rates = [learning_rate_by_the_authors_rule(m["step"] - 1, **rule) for m in train]
    # Two epochs of 35 records: a warm-up over the first (steps 0-4), the decay at its end.
    assert 0 == rates[0] < rates[4] and rates[5] == pytest.approx(0.1 * 0.1 * GLOBAL_BATCH / 256)
    for m, expected in zip(train, rates):
        assert m["learning_rate"] == pytest.approx(expected, rel=1e-6), m["step"]
        step = m["step"] - 1  # the step that ran
        keep = np.float32(1) - np.float32(step / (STEPS - 1)) * (np.float32(1) - np.float32(0.9))
        assert m["keep_prob"] == pytest.approx(float(keep), abs=1e-7), step
    assert train[0]["keep_prob"] == 1.0
    assert train[-1]["keep_prob"] == float(np.float32(0.9))


@pytest.mark.multihost
def test_hosts_read_disjoint_slices_that_cover_the_train_records(runs, data):
    # 35 records on 2 hosts: contiguous slices of 18 and 17.
    expected_slices = [set(range(0, 18)), set(range(18, 35))]
    rows = GLOBAL_BATCH // PROCESSES
    for process, expected in enumerate(expected_slices):
        lines = (runs["unbroken"] / "debug" / f"train_records.process{process}.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines]
        assert [s["step"] for s in steps] == list(range(STEPS))
        assert all(len(s["records"]) == rows for s in steps)
        ids = [r for s in steps for r in s["records"]]
        assert set(ids) <= expected
        # The first 16 reads are within the first epoch of the slice: no record twice.
        first_epoch = ids[: len(expected) // rows * rows]
        assert len(set(first_epoch)) == len(first_epoch)
        # A full epoch of the host's stream, one row a batch, reads its whole slice once.
        batches = input_pipeline.train_batches(
            data,
            seed=0,
            process_index=process,
            process_count=PROCESSES,
            local_batch=1,
            image_size=8,
            crop_fraction=0.875,
            threads=1,
        )
        iterator = iter(batches)
        epoch = [int(next(iterator)["record"][0]) for _ in range(len(expected))]
        assert sorted(epoch) == sorted(expected)


@pytest.mark.multihost
def test_evaluation_counts_every_val_image_once_and_top1_is_the_recount(runs, data):
    labels = [label for label, _ in _records(data, "val")]
    evals = {m["step"]: m for m in _eval_lines(_unbroken_metrics(runs))}
    for step in (4, 8):
        dumped = np.load(runs["unbroken"] / "debug" / f"eval_step{step}.npz")
        real = dumped["record"] >= 0
        # 2 processes x 2 batches of 4 rows: 16 rows, 13 images, 3 padding rows.
        assert len(real) == 16 and real.sum() == VAL_IMAGES
        assert sorted(dumped["record"][real].tolist()) == list(range(VAL_IMAGES))
        assert dumped["label"][real].tolist() == [labels[r] for r in dumped["record"][real]]
        logits = dumped["logits"][real].astype(np.float64)
        truth = dumped["label"][real]
        top1 = np.mean(np.argmax(logits, axis=1) == truth)
        top5 = np.mean([t in np.argsort(-row)[:5] for row, t in zip(logits, truth)])
        assert evals[step]["top1"] == top1
        assert evals[step]["top5"] == top5
        assert evals[step]["eval_images"] == VAL_IMAGES


@pytest.mark.multihost
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_data_workers_included(runs):
    stopped = _train_lines(runs["stopped_metrics"])
    last = stopped[-1]["step"]
    # Agreed while process 0 was held at step 1's upload: it had last asked at loop index 0 and
    # process 1 at index 1 at most, so every process stops after index 1 or 2, having run 2 or 3 steps.
    point = runs["sync_points"][0]
    assert runs["sync_points"] == [point] * PROCESSES
    assert point in (SIGTERM_STEP, SIGTERM_STEP + 1)
    assert last == point + 1
    assert runs["stopped_checkpoints"] == [last]
    assert f"SIGTERM: saved step {last}, stopping" in runs["stopped_text"]


@pytest.mark.multihost
def test_a_work_directory_in_a_bucket_holds_every_output_and_nothing_lands_locally(runs, bucket):
    names = bucket.names("preempted")
    assert "metrics.jsonl" in names
    assert _step_dirs(name.removeprefix("checkpoints/") for name in names if name.startswith("checkpoints/"))
    # One events file a launch, both in the bucket.
    events = [name for name in names if name.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 2
    assert b"top1" in b"".join(bucket.read(f"preempted/{name}") for name in events)
    assert {f"debug/train_records.process{p}.jsonl" for p in range(PROCESSES)} | {f"debug/eval_step{STEPS}.npz"} <= set(
        names
    )
    # pathlib would have made gs://bucket/run the relative folder gs:/bucket/run.
    assert list(runs["cwd"].iterdir()) == []
    assert not (ROOT / "gs:").exists()


@pytest.mark.multihost
def test_the_resumed_run_ends_bit_equal_to_the_unbroken_run(runs, bucket):
    unbroken = _unbroken_metrics(runs)
    resumed = _metrics(bucket.read("preempted/metrics.jsonl").decode())
    keys = ("step", "loss", "learning_rate", "keep_prob")
    assert [[m[k] for k in keys] for m in _train_lines(resumed)] == [
        [m[k] for k in keys] for m in _train_lines(unbroken)
    ]
    assert _eval_lines(resumed) == [m for m in _eval_lines(unbroken) if m["step"] == STEPS]
    for process in range(PROCESSES):
        name = f"debug/train_records.process{process}.jsonl"
        assert bucket.read(f"preempted/{name}").decode() == (runs["unbroken"] / name).read_text()
    a = np.load(runs["unbroken"] / "debug" / f"eval_step{STEPS}.npz")
    b = np.load(io.BytesIO(bucket.read(f"preempted/debug/eval_step{STEPS}.npz")))
    for name in ("record", "label", "logits"):
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.multihost
def test_the_best_evaluation_over_the_run_is_reported(runs):
    evals = _eval_lines(_unbroken_metrics(runs))
    best = max(evals, key=lambda m: m["top1"])
    assert f"best top1 {best['top1']:.6g} at step {best['step']}" in runs["unbroken_text"]


# ----------------------------------------------------------------------------------------
# Unit checks: the schedules at their boundaries, the configuration's errors.


def _schedule_config(**fields):
    config = trainer.ml_collections.ConfigDict(dict(_cpu_config()))
    config.update(fields)
    return config


def test_keep_prob_reaches_the_target_at_the_last_step():
    schedule = trainer.keep_prob_schedule(_schedule_config(keep_prob=0.9), 101)
    assert float(schedule(0)) == 1.0
    assert float(schedule(50)) == pytest.approx(0.95, abs=1e-7)
    assert float(schedule(100)) == float(np.float32(0.9))
    constant = trainer.keep_prob_schedule(_schedule_config(keep_prob_schedule="constant"), 101)
    assert float(constant(0)) == float(np.float32(0.9))
    assert trainer.keep_prob_schedule(_schedule_config(regularizer="none"), 101) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data_dir", "", r"config\.data_dir must be the directory prepare\.py wrote .*got ''"),
        (
            "data_dir",
            "gs://b/imagenet",
            r"config\.data_dir must be a directory of this machine .*got 'gs://b/imagenet'",
        ),
        (
            "batch_norm_group_size",
            3,
            r"config\.batch_norm_group_size must be 0 \(the global batch\) or a divisor of global_batch_size=8, got 3",
        ),
        ("regularizer", "dropout", r"config\.regularizer must be one of \('none', 'dropblock'\), got 'dropout'"),
        ("dtype", "float16", r"config\.dtype must be one of \('bfloat16', 'float32'\), got 'float16'"),
        ("model_depth", 51, r"config\.model_depth must be one of \(18, 34, 50, 101, 152, 200\), got 51"),
        ("global_batch_size", 0, r"config\.global_batch_size must be a positive integer, got 0"),
        ("keep_prob", 0.0, r"config\.keep_prob must be in \(0, 1\], got 0\.0"),
        ("label_smoothing", 1.0, r"config\.label_smoothing must be in \[0, 1\), got 1\.0"),
        ("num_train_steps", 0, r"config\.num_train_steps must be a positive integer, or -1"),
        ("lr_decay_epochs", (60, 30), r"config\.lr_decay_epochs must be increasing epochs .*got \(60, 30\)"),
    ],
)
def test_a_bad_config_value_is_named_with_what_is_allowed(field, value, message):
    config = _schedule_config(data_dir="/data")
    config[field] = value
    with pytest.raises(ValueError, match=message):
        trainer.check_config(config)


def test_a_data_dir_without_prepared_shards_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no info\.json: .*examples/imagenet/prepare\.py --source"):
        input_pipeline.read_info(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no val-\*\.array_record shards"):
        input_pipeline.shard_files(tmp_path, "val")


def test_the_imagenet_extra_lists_the_examples_requirements():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["imagenet"]
    lines = (EXAMPLE / "requirements.txt").read_text().splitlines()
    assert sorted(extra) == sorted(line for line in lines if line and not line.startswith("#"))


def test_a_resumed_run_keeps_the_metrics_its_checkpoint_holds_and_reports_the_best_of_all(tmp_path):
    # An earlier launch logged steps 1-5, evaluated at 2 and 4, and was killed; its checkpoint is step 4.
    earlier = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, {"step": 2, "top1": 0.5}]
    earlier += [{"step": 3, "loss": 1.8}, {"step": 4, "loss": 1.7}, {"step": 4, "top1": 0.3}, {"step": 5, "loss": 1.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in earlier))
    writer = trainer.MetricsWriter(trainer.epath.Path(tmp_path), resumed_step=4)
    # The rerun evaluates step 4 again first, then goes on from step 5.
    for record in ({"step": 4, "top1": 0.25}, {"step": 5, "loss": 1.65}, {"step": 6, "top1": 0.4}):
        writer.write(record)
    best = writer.best("top1")
    writer.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == [*earlier[:5], {"step": 4, "top1": 0.25}, {"step": 5, "loss": 1.65}, {"step": 6, "top1": 0.4}]
    # The best evaluation of the whole run, from the earlier launch.
    assert best == {"step": 2, "top1": 0.5}
    assert not list(tmp_path.glob("*.partial"))


def test_padding_rows_count_for_nothing_even_when_predicted_right():
    # Six classes; rows 0-3 real, rows 4-5 padding whose logits point at their label.
    labels = np.array([0, 1, 2, 3, 4, 5])
    logits = np.full((6, 6), -1.0, np.float32)
    logits[np.arange(6), labels] = 5.0  # every row's top-1 is its label ...
    logits[1] = np.arange(6)[::-1]  # ... but row 1's: class 0 first, its label 1 second
    logits[2] = np.arange(6)  # row 2: its label 2 is the 4th largest, so within the top 5
    logits[3] = np.arange(6)[::-1]  # row 3: label 3 is the 4th, in the top 5
    mask = np.array([True, True, True, True, False, False])
    counts = {name: int(value) for name, value in trainer.correct_counts(logits, labels, mask).items()}
    # Recounted by hand: top-1 right for row 0 only; top-5 for rows 0, 1, 2 and 3.
    assert counts == {"top1": 1, "top5": 4, "eval_images": 4}
