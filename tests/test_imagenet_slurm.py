"""``--distributed`` under SLURM: one task per node drives every GPU of its node.

``jax.distributed.initialize()`` under SLURM gives each process the single GPU
``SLURM_LOCALID`` (``jax/_src/clusters/cluster.py``); ``pod.slurm_local_device_ids``
gives a task alone on its node all the GPUs SLURM made visible to it. Checked here:
the rule on the environments SLURM sets for the usual layouts, and two processes
launched with the environment SLURM gives two one-task nodes of two GPUs each
(``SLURM_JOB_ID``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NODEID``, ``SLURM_STEP_NODELIST``, ``SLURM_STEP_TASKS_PER_NODE``,
``SLURM_GPUS_ON_NODE``, ``CUDA_VISIBLE_DEVICES``), ``--distributed`` and 2 CPU devices
each: they find each other through JAX's own SLURM detection and train. What they pass
to ``jax.distributed.initialize``, and the CUDA and ROCm device settings it leaves, are
recorded by a ``sitecustomize`` on their ``PYTHONPATH``: ``local_device_ids`` restricts
only CUDA and ROCm devices, so on CPUs the arguments are what can be checked. That all
GPUs then train, and NCCL between nodes, only a GPU node shows.
"""

import json
import socket
import sys
import textwrap

import pod
import pytest

from helpers import IMAGENET_EXAMPLE, compilation_cache, launch_environment, prepared_imagenet, running

# examples/imagenet's own requirements, not the package's minimums: make test-min leaves it out.
pytestmark = pytest.mark.launches

EIGHT_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}


def _slurm(tasks_per_node, node=0, local=0, **extra):
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "32",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_NODELIST": "gpu[001-004]",
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        **extra,
    }


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        # srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8: every GPU of the node.
        (_slurm("1(x4)", **EIGHT_GPUS), list(range(8))),
        # Visible GPUs are numbered from 0 in the process, whatever their numbers on the node.
        (_slurm("1(x4)", CUDA_VISIBLE_DEVICES="4,5,6,7"), [0, 1, 2, 3]),
        (_slurm("1(x4)", ROCR_VISIBLE_DEVICES="0,1"), [0, 1]),
        (_slurm("1(x4)", SLURM_GPUS_ON_NODE="8"), list(range(8))),
        # A node of its own among nodes running several tasks.
        (_slurm("2(x2),1", node=2, **EIGHT_GPUS), list(range(8))),
        # srun --ntasks-per-node=8 --gpus-per-node=8: one GPU each, as JAX picks (SLURM_LOCALID).
        (_slurm("8(x4)", local=3, **EIGHT_GPUS), None),
        (_slurm("2(x2),1", node=1, **EIGHT_GPUS), None),
        # The user's own choice, and no SLURM at all.
        (_slurm("1(x4)", JAX_LOCAL_DEVICE_IDS="0,1", **EIGHT_GPUS), None),
        (EIGHT_GPUS, None),
    ],
)
def test_a_task_alone_on_its_node_drives_every_gpu_slurm_gives_it(environ, expected):
    assert pod.slurm_local_device_ids(environ) == expected


def test_a_task_slurm_names_no_gpu_for_says_how_to_choose(capsys):
    assert pod.slurm_local_device_ids(_slurm("1(x4)")) is None
    assert "set JAX_LOCAL_DEVICE_IDS=0,1,..." in capsys.readouterr().err


RECORD_INITIALIZE = textwrap.dedent(
    """
    import json
    import os

    if os.environ.get("RECORD_DISTRIBUTED_INITIALIZE"):
        import jax

        _initialize = jax.distributed.initialize

        def _recorded(*args, **kwargs):
            _initialize(*args, **kwargs)
            record = {
                "args": list(args),
                "kwargs": kwargs,
                "jax_cuda_visible_devices": jax.config.read("jax_cuda_visible_devices"),
                "jax_rocm_visible_devices": jax.config.read("jax_rocm_visible_devices"),
            }
            path = os.environ["RECORD_DISTRIBUTED_INITIALIZE"] + f".{jax.process_index()}.json"
            with open(path, "w") as file:
                json.dump(record, file)

        jax.distributed.initialize = _recorded
    """
)


def _free_slurm_job_id():
    # JAX's SLURM detection puts the coordinator on port 61440 + SLURM_JOB_ID % 4096.
    for job in range(4096):
        with socket.socket() as probe:
            try:
                probe.bind(("localhost", 61440 + job))
            except OSError:
                continue
            return 4096 * 1000 + job
    raise RuntimeError("no free port for the coordinator")


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    data = prepared_imagenet(tmp_path_factory)
    base = tmp_path_factory.mktemp("slurm")
    (base / "hooks").mkdir()
    (base / "hooks" / "sitecustomize.py").write_text(RECORD_INITIALIZE)
    job = _free_slurm_job_id()
    command = [sys.executable, IMAGENET_EXAMPLE / "train.py", "--config", IMAGENET_EXAMPLE / "configs" / "cpu.py"]
    command += ["--workdir", base / "workdir", f"--config.data_dir={data}", "--config.num_train_steps=2"]
    command += ["--config.model_depth=18", "--config.regularizer=none", "--distributed"]
    launches = []
    for task in range(2):
        env = launch_environment(compilation_cache(tmp_path_factory), PYTHONPATH=str(base / "hooks"))
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
        env |= {
            "RECORD_DISTRIBUTED_INITIALIZE": str(base / "initialize"),
            # Two nodes of one task and two GPUs each, as srun sets them up.
            "SLURM_JOB_ID": str(job),
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(task),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(task),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
            "SLURM_GPUS_ON_NODE": "2",
            "CUDA_VISIBLE_DEVICES": "0,1",
        }
        launches.append((command, env, base / f"task{task}.log"))
    logs = [open(path, "w") for _, _, path in launches]  # noqa: SIM115 (closed below)
    try:
        with (
            running(launches[0][0], logs[0], launches[0][1], base) as first,
            running(launches[1][0], logs[1], launches[1][1], base) as second,
        ):
            codes = [first.wait(timeout=600), second.wait(timeout=600)]
    finally:
        for log in logs:
            log.close()
    texts = [path.read_text() for _, _, path in launches]
    for code, text in zip(codes, texts):
        assert code == 0, text[-8000:]
    records = [json.loads((base / f"initialize.{task}.json").read_text()) for task in range(2)]
    return texts, records


@pytest.mark.multihost
def test_two_slurm_tasks_join_and_train_on_every_device(slurm_run):
    texts, _ = slurm_run
    first_line = next(line for line in texts[0].splitlines() if "process(es)" in line)
    assert first_line.startswith("2 process(es), 4 device(s)")
    assert "step 2 loss" in texts[0]


@pytest.mark.multihost
def test_each_task_leaves_every_gpu_of_its_node_visible(slurm_run):
    _, records = slurm_run
    for record in records:
        # JAX's own SLURM detection finds the coordinator and the process; the GPUs are the example's.
        assert record["args"] == [] and record["kwargs"] == {"local_device_ids": [0, 1]}
        # What JAX makes of it: both GPUs, not SLURM_LOCALID's one ("0").
        assert record["jax_cuda_visible_devices"] == record["jax_rocm_visible_devices"] == "0,1"
