"""``examples/imagenet``: prepare a tiny ImageNet folder, train ResNet-50 on two simulated hosts, resume after SIGTERM.

A few dozen random JPEGs (mixed sizes and aspect ratios, one grayscale, seven wnids;
13 val images, an odd count) go through ``prepare.py``; ``train.py`` then runs
``configs/cpu.py`` (ResNet-50's structure at width 8, 32-pixel images) with
``--simulate-hosts 2`` three times, as a user would: once unbroken, once sent SIGTERM
after its first logged step, and once more in that work directory, to the end. The
three launches share one persistent compilation cache, so the later two load the
programs the first compiled. The expected values come from the source folder and from
NumPy recounts, not from the code under test.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagenet"
sys.path[:0] = [str(EXAMPLE), str(ROOT / "examples")]
import input_pipeline  # noqa: E402
import prepare  # noqa: E402


def _load_trainer():
    # examples/train.py is imported as "train" by other test modules: this one gets its own name.
    spec = importlib.util.spec_from_file_location("imagenet_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagenet_train"] = module
    spec.loader.exec_module(module)
    return module


trainer = sys.modules.get("imagenet_train") or _load_trainer()

WNIDS = [f"n{1_000_000 + 7919 * i:08d}" for i in range(7)]
TRAIN_PER_CLASS = 5
VAL_IMAGES = 13
STEPS = 4
# Two processes of two CPU devices, two rows each: 4 rows a process, 8 a step.
GLOBAL_BATCH = 8
PROCESSES = 2
TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------
# The tiny ImageNet, prepared.


def _write_image(path, rng, mode="RGB"):
    height, width = (int(v) for v in rng.integers(24, 97, size=2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    image.save(path, format="JPEG", quality=90)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            # ImageNet has grayscale JPEGs: the pipeline makes them RGB.
            _write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, "L" if (c, i) == (0, 0) else "RGB")
    for i in range(VAL_IMAGES):
        wnid = WNIDS[(3 * i) % len(WNIDS)]
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        _write_image(root / "val" / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG", rng)
    return root


def _environment(cache):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # The suite's warnings are errors in the launched processes too, but for ml_collections'
    # own use of a deprecated importlib call.
    env["PYTHONWARNINGS"] = "error,ignore:the load_module() method is deprecated:DeprecationWarning"
    return env


@pytest.fixture(scope="module")
def data(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared")
    command = [sys.executable, EXAMPLE / "prepare.py", "--source", source, "--output", output]
    command += ["--train-shards", "3", "--val-shards", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(output / "unused"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


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
    _write_image(tmp_path / "train" / WNIDS[0] / "a.JPEG", np.random.default_rng(0))
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
        *(f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}", "--config.eval_every_steps=2"),
        *("--config.debug_dumps=True", "--simulate-hosts", str(PROCESSES)),
        *("--timeout", str(TIMEOUT_S), *extra),
    ]


def _launch(command, env, log):
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _finish(child, log):
    try:
        child.wait(timeout=TIMEOUT_S + 60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = pathlib.Path(log.name).read_text()
    assert child.returncode == 0, text[-8000:]
    return text


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    env = _environment(base / "compilation_cache")
    unbroken, preempted = base / "unbroken", base / "preempted"
    with open(base / "unbroken.log", "w") as log:
        # Checkpoints every 2 steps, and one traced step (jax.profiler) after the first.
        extra = ("--config.checkpoint_every_steps=2", "--config.profile_first_step=1", "--config.profile_steps=1")
        _finish(_launch(_train_command(unbroken, data, *extra), env, log), log)
    # No checkpoint interval within the run: the stopped run's only checkpoint is the SIGTERM's.
    # One evaluation, at the end (the unbroken run has checked the interval).
    no_interval = ("--config.checkpoint_every_steps=100", "--config.eval_every_steps=0")
    with open(base / "preempted.log", "w") as log:
        child = _launch(_train_command(preempted, data, *no_interval), env, log)
        # SIGTERM once step 1 is logged: the run is past its start-up, and has steps left.
        deadline = time.monotonic() + TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            if (preempted / "metrics.jsonl").is_file() and '"loss"' in (preempted / "metrics.jsonl").read_text():
                child.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        stopped_text = _finish(child, log)
    stopped_metrics = _metrics(preempted)
    stopped_checkpoints = sorted(int(p.name) for p in (preempted / "checkpoints").iterdir() if p.name.isdigit())
    with open(base / "resumed.log", "w") as log:
        resumed_text = _finish(_launch(_train_command(preempted, data, *no_interval), env, log), log)
    return {
        "unbroken": unbroken,
        "preempted": preempted,
        "stopped_text": stopped_text,
        "stopped_metrics": stopped_metrics,
        "stopped_checkpoints": stopped_checkpoints,
        "resumed_text": resumed_text,
    }


def _train_lines(metrics):
    return [m for m in metrics if "loss" in m]


def _eval_lines(metrics):
    return [m for m in metrics if "top1" in m]


@pytest.mark.multihost
def test_metrics_hold_what_is_promised_written_once(runs):
    metrics = _metrics(runs["unbroken"])
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
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert set(m) == {"step", "top1", "top5", "eval_images"}
        assert m["eval_images"] == VAL_IMAGES
    events = list((runs["unbroken"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    content = events[0].read_bytes()
    for tag in (b"loss", b"learning_rate", b"keep_prob", b"top1", b"top5", b"eval_images"):
        assert tag in content, tag
    assert list((runs["unbroken"] / "profile").rglob("*.xplane.pb"))
    # checkpoint_every_steps=2 over 4 steps, the last two kept.
    assert sorted(int(p.name) for p in (runs["unbroken"] / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def _cpu_config():
    from configs import cpu

    return cpu.get_config()


@pytest.mark.multihost
def test_the_logged_schedules_are_the_recipe_written_out(runs):
    config = _cpu_config()
    train = _train_lines(_metrics(runs["unbroken"]))
    peak = 0.1 * GLOBAL_BATCH / 256
    steps_per_epoch = len(WNIDS) * TRAIN_PER_CLASS / GLOBAL_BATCH
    warmup = config.warmup_epochs * steps_per_epoch
    boundaries = [round(e / 90 * STEPS) for e in (30, 60, 80)]
    for m in train:
        step = m["step"] - 1  # the step that ran
        decayed = peak * 0.1 ** sum(step >= b for b in boundaries)
        expected = peak * step / warmup if step < warmup else decayed
        assert m["learning_rate"] == pytest.approx(expected, rel=1e-6), step
        keep = np.float32(1) - np.float32(step / (STEPS - 1)) * (np.float32(1) - np.float32(0.9))
        assert m["keep_prob"] == pytest.approx(float(keep), abs=1e-7), step
    assert train[0]["keep_prob"] == 1.0
    assert train[-1]["keep_prob"] == float(np.float32(0.9))


@pytest.mark.multihost
def test_hosts_read_disjoint_slices_that_cover_the_train_records(runs, data):
    # 35 records on 2 hosts: contiguous slices of 18 and 17.
    expected_slices = [set(range(0, 18)), set(range(18, 35))]
    for process, expected in enumerate(expected_slices):
        lines = (runs["unbroken"] / "debug" / f"train_records.process{process}.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines]
        assert [s["step"] for s in steps] == list(range(STEPS))
        assert all(len(s["records"]) == GLOBAL_BATCH // PROCESSES for s in steps)
        ids = [r for s in steps for r in s["records"]]
        # 16 reads within the first epoch of the slice: no record twice, none of the other host's.
        assert len(set(ids)) == len(ids) and set(ids) <= expected
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
    evals = {m["step"]: m for m in _eval_lines(_metrics(runs["unbroken"]))}
    for step in (2, 4):
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
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    stopped = _train_lines(runs["stopped_metrics"])
    last = stopped[-1]["step"]
    assert 1 <= last < STEPS, "the SIGTERM came after the run ended"
    assert runs["stopped_checkpoints"] == [last]
    assert f"SIGTERM: saved step {last}, stopping" in runs["stopped_text"]


@pytest.mark.multihost
def test_the_resumed_run_ends_bit_equal_to_the_unbroken_run(runs):
    unbroken, resumed = _metrics(runs["unbroken"]), _metrics(runs["preempted"])
    keys = ("step", "loss", "learning_rate", "keep_prob")
    assert [[m[k] for k in keys] for m in _train_lines(resumed)] == [
        [m[k] for k in keys] for m in _train_lines(unbroken)
    ]
    assert _eval_lines(resumed) == [m for m in _eval_lines(unbroken) if m["step"] == STEPS]
    for process in range(PROCESSES):
        name = f"debug/train_records.process{process}.jsonl"
        assert (runs["preempted"] / name).read_text() == (runs["unbroken"] / name).read_text()
    a = np.load(runs["unbroken"] / "debug" / f"eval_step{STEPS}.npz")
    b = np.load(runs["preempted"] / "debug" / f"eval_step{STEPS}.npz")
    for name in ("record", "label", "logits"):
        assert np.array_equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------
# Unit checks: the schedules at their boundaries, the configuration's errors.


def _schedule_config(**fields):
    config = trainer.ml_collections.ConfigDict(dict(_cpu_config()))
    config.update(fields)
    return config


@pytest.mark.parametrize(
    ("steps", "boundaries"),
    # 90 epochs of 10 steps: the authors' 30, 60, 80; a run of 45 epochs: the same, stretched.
    [(900, (300, 600, 800)), (450, (150, 300, 400))],
)
def test_learning_rate_at_the_boundaries_of_the_recipe(steps, boundaries):
    config = _schedule_config(global_batch_size=512, base_learning_rate=0.1, warmup_epochs=5.0)
    schedule = trainer.learning_rate_schedule(config, steps_per_epoch=10.0, steps=steps)
    peak = 0.1 * 512 / 256
    expected = {0: 0.0, 25: peak / 2, 49: peak * 49 / 50, 50: peak}
    first, second, third = boundaries
    expected |= {first - 1: peak, first: peak / 10, second - 1: peak / 10, second: peak / 100}
    expected |= {third - 1: peak / 100, third: peak / 1000, steps - 1: peak / 1000}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step


def test_without_warm_up_the_first_step_has_the_full_rate():
    schedule = trainer.learning_rate_schedule(_schedule_config(warmup_epochs=0.0), 10.0, 900)
    assert float(schedule(0)) == pytest.approx(0.1 * 8 / 256, rel=1e-6)


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
