"""Measuring ``examples/imagenet``: synthetic data, the metrics' throughput, ``benchmarks/input.py``.

The throughput's bookkeeping is checked with a stand-in clock, not by racing a real one;
the synthetic run and the benchmark run as a user would run them, and are checked for
what they print and write, not for their speed.
"""

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import helpers

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = helpers.IMAGENET_EXAMPLE
trainer = helpers.imagenet_trainer()


class StandInClock:
    """A clock that reads what the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_step_clock_leaves_out_what_is_not_training_and_counts_the_waits():
    time = StandInClock()
    clock = trainer.StepClock(time)
    with clock.waiting():  # the first batch: 2 s
        time.now = 2.0
    time.now = 5.0  # steps
    with clock.excluded():  # an evaluation and a checkpoint: 10 s
        time.now = 15.0
    with clock.waiting():  # 1 s
        time.now = 16.0
    time.now = 20.0
    # 20 s of wall time, 10 of them training steps, 3 of those waiting.
    assert clock.lap() == (10.0, 0.3)
    time.now = 24.0
    assert clock.lap() == (4.0, 0.0)
    with clock.excluded():  # the next interval: only a compilation
        time.now = 30.0
    assert clock.lap() == (0.0, 0.0)


class RecordingClock(trainer.StepClock):
    """A StepClock that tells what the loop is in: "excluded", "waiting", or "steps"."""

    now = "steps"

    @contextlib.contextmanager
    def _in(self, part, timed):
        with timed():
            previous, RecordingClock.now = RecordingClock.now, part
            try:
                yield
            finally:
                RecordingClock.now = previous

    def excluded(self):
        return self._in("excluded", super().excluded)

    def waiting(self):
        return self._in("waiting", super().waiting)


def test_the_loop_keeps_evaluations_checkpoints_and_the_compilation_out_of_the_steps_time(tmp_path, monkeypatch):
    import jax
    from configs import cpu

    classes = ["n01", "n02"]
    shards = [[(i % 2, helpers.photo_jpeg(24 + i, 30, seed=i, quality=70)) for i in range(10)]]
    data_dir = helpers.write_prepared(tmp_path / "data", classes, {"train": shards, "val": shards})
    events = []

    def recorded(name, function):
        def call(*args, **kwargs):
            events.append((name, RecordingClock.now))
            return function(*args, **kwargs)

        return call

    def batches_recorded(original):
        def on_devices(*args, **kwargs):
            for item in original(*args, **kwargs):
                events.append(("batch", RecordingClock.now))
                yield item

        return on_devices

    def manager_recorded(original):
        def checkpoint_manager(*args, **kwargs):
            manager = original(*args, **kwargs)
            manager.save = recorded("save", manager.save)
            return manager

        return checkpoint_manager

    monkeypatch.setattr(trainer, "StepClock", RecordingClock)
    monkeypatch.setattr(trainer, "evaluate", recorded("evaluate", trainer.evaluate))
    monkeypatch.setattr(trainer.pod, "checkpoint_manager", manager_recorded(trainer.pod.checkpoint_manager))
    monkeypatch.setattr(trainer.input_pipeline, "on_devices", batches_recorded(trainer.input_pipeline.on_devices))
    monkeypatch.setattr(jax.stages.Lowered, "compile", recorded("compile", jax.stages.Lowered.compile))
    config = cpu.get_config()
    config.unlock()
    config.update(data_dir=str(data_dir), num_train_steps=3, eval_every_steps=1, checkpoint_every_steps=1)
    # ResNet-18's structure compiles faster than ResNet-50's, and the loop is the same.
    config.update(data_threads=1, global_batch_size=4, model_depth=18)
    trainer.train_and_evaluate(config, tmp_path / "work")
    assert {name for name, _ in events} == {"evaluate", "save", "compile", "batch"}
    # The train batches are waited for; evaluations (their batches included), checkpoints and
    # the compilation are outside the steps' time.
    assert [(name, now) for name, now in events if now == "steps"] == []
    assert ("batch", "waiting") in events


def _environment():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env["PYTHONUNBUFFERED"] = "1"
    # The suite's warnings are errors in the launched processes too, but for ml_collections'
    # own use of a deprecated importlib call.
    env["PYTHONWARNINGS"] = "error,ignore:the load_module() method is deprecated:DeprecationWarning"
    return env


def test_synthetic_data_trains_without_a_data_dir_on_1000_classes_and_skips_evaluation(tmp_path):
    command = [
        *(sys.executable, EXAMPLE / "train.py", "--config", EXAMPLE / "configs" / "cpu.py", "--workdir", tmp_path),
        *("--config.synthetic_data=True", "--config.num_train_steps=3", "--config.eval_every_steps=2"),
        # ResNet-18's structure compiles faster than ResNet-50's; the data path is the same.
        *("--config.checkpoint_every_steps=2", "--config.model_depth=18"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # ImageNet's 1,281,167 train images at the CPU config's global batch of 8.
    first = done.stdout.splitlines()[0]
    assert first.startswith("1 process(es), 2 device(s), global batch 8, 160145.9 steps an epoch"), first
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # training lines only: no evaluation
    for m in metrics:
        assert m["images_per_second_per_device"] > 0 and 0 <= m["input_wait_fraction"] <= 1
    # An untrained network's loss is near ln(classes): 6.9 for 1000 classes (ln 7 = 1.9 for the tests' data).
    assert abs(metrics[0]["loss"] - math.log(1000)) < 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_without_data_dir_or_synthetic_data_the_config_is_refused():
    from configs import cpu

    config = trainer.ml_collections.ConfigDict(dict(cpu.get_config()))
    with pytest.raises(ValueError, match=r"config\.data_dir must be the directory prepare\.py wrote"):
        trainer.check_config(config)
    config.synthetic_data = True
    trainer.check_config(config)


def table_rows(stdout):
    """The first Markdown table's rows on stdout, as lists of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert rows[1] == ["---", "---:", "---:", "---", "---:", "---:", "---:", "---:"], rows[:2]
    end = next((i for i, row in enumerate(rows[2:], 2) if row[0] == "sampler"), len(rows))
    return rows[0], rows[2:end], rows[end:]


def test_the_input_benchmark_prints_every_row_in_its_quick_mode(tmp_path):
    results = tmp_path / "input.json"
    command = [sys.executable, ROOT / "benchmarks" / "input.py", "--quick", "--json", results]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    header, rows, crops = table_rows(done.stdout)
    assert header[0] == "measured" and header[-2:] == ["ratio best", "ratio median"]
    with_tensorflow = importlib.util.find_spec("tensorflow") is not None
    tensorflow_rows = [("train view, 1 thread", "tf.data, 1 thread"), ("eval view, 1 thread", "tf.data, 1 thread")]
    assert [(row[0], row[3]) for row in rows] == [
        *tensorflow_rows[:1] * with_tensorflow,
        ("train view, 1 thread", "0.3.0 (Pillow, whole image)"),
        *tensorflow_rows[1:] * with_tensorflow,
        ("eval view, 1 thread", "0.3.0 (Pillow, whole image)"),
        ("train_batches, 2 threads", "train_batches, 1 thread"),
        ("train_batches, 16 threads, 20 ms sleep", "ideal 16 / 20 ms"),
    ]
    for row in rows:
        values = [float(cell) for cell in row[1:3] + row[4:]]
        assert all(math.isfinite(v) and v > 0 for v in values), row
        assert float(row[6]) == pytest.approx(float(row[1]) / float(row[4]), rel=0.02)
    assert bool(crops) == with_tensorflow
    saved = json.loads(results.read_text())
    assert saved["images"] == 12 and len(saved["table"]) == len(rows)
