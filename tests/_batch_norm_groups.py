"""Run by ``tests/test_imagenet_recipe.py`` with 4 CPU devices: ResNet-50's training-mode forward pass in groups.

``configs/cpu.py`` at width 4 (ResNet-50 with DropBlock at its 36 places), a global batch
of 8 cut into groups of 2, one group a device. Writes to the folder given as argument:
``logits.npz`` (the logits of a base batch; of the batch with group 1's samples replaced;
of groups 0 and 1 given the same images, at a step that drops and at step 0, which keeps
everything) and ``program.json`` (the collectives of the compiled pass).
"""

import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import imagenet_trainer

trainer = imagenet_trainer()
import pod  # noqa: E402
from configs import cpu  # noqa: E402

MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "ragged-all-to-all")


def collectives(hlo):
    """The lines that move data between devices, and the element counts of every all-reduced array."""
    moving, reduced = [], []
    for line in hlo.splitlines():
        if any(f" {op}(" in line or f" {op}-start(" in line for op in MOVING):
            moving.append(line.strip())
        match = re.search(r"=\s*(.*?)\sall-reduce(?:-start)?\(", line)
        if match:
            for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
                reduced.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return {"moving": moving, "all_reduce_elements": reduced}


def main(out):
    assert jax.device_count() == 4, jax.devices()
    config = cpu.get_config()
    config.update(model_width=4, keep_prob=0.5, num_train_steps=2, batch_norm_group_size=2, data_dir="/unused")
    run = trainer.Trainer(config, num_classes=7, train_records=64)
    replicated, batched = pod.data_shardings()
    state, other = run.initial_state(replicated)
    # Step 1, the last of 2: keep_prob 0.5 in group 4; step 0: keep_prob 1.
    dropping = dict(state, step=jax.device_put(jnp.int32(1), replicated))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)

    def logits(batch_images, at=dropping):
        return np.asarray(run.forward(at["params"], at, other, jax.device_put(batch_images, batched))[0])

    changed = images.copy()
    changed[2:4] = 255 - changed[2:4]
    alike = images.copy()
    alike[2:4] = images[0:2]
    np.savez(
        out / "logits.npz",
        base=logits(images),
        group1_changed=logits(changed),
        groups01_alike=logits(alike),
        groups01_alike_kept=logits(alike, at=state),
    )
    hlo = run.forward.lower(dropping["params"], dropping, other, jax.device_put(images, batched)).compile().as_text()
    widest = max(int(np.size(leaf)) for leaf in jax.tree.leaves(state["batch_stats"]))
    (out / "program.json").write_text(json.dumps({"collectives": collectives(hlo), "widest_channels": widest}))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
