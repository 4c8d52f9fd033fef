"""The training step reads nothing back to the host (issue 17): what ``RunOptions.sync_debug`` checks on CUDA.

On the CPU the same window of the real loop (a batch's augmentation through ``after_step``) is watched by the test
suite's host-sync detector, swapped in where the loop switches CUDA's sync debug mode on. The augmentation runs its
CUDA strategy (whole batch, ``SUBSET_ON_CPU = False``), as it does on a GPU.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

from micronet.training import RunOptions, augment, loop, run_all
from micronet.training.recipe import parse_recipe
from tests.host_syncs import HostSyncOps

STAGES = {
    "teacher": {"epochs": 1, "loss": "ce"}, "student": {"epochs": 1},
    "prune": {"epochs": 1, "sparsity": 0.75, "mask_update_every": 1, "mask_update_until": 3},
    "quant-act": {"epochs": 1, "act_bits": 4}, "quant-weight": {"epochs": 1, "weight_bits": 4},
    "prune-fc": {"epochs": 1, "sparsity": 0.5, "scope": "layer", "mask_update_every": 1, "mask_update_until": 3},
}


def _recipe(stages: list[str]):
    return parse_recipe({
        "name": "syncs", "model": "densenet_bc:depth=10,growth=4", "teacher_model": "densenet_bc:depth=10,growth=4",
        "seed": 0, "data": {"normalization": "cifar10", "holdout": 0, "subsample": 128},
        "augment": {"policy": "micronet2019", "ops_per_image": 2, "pad_fill": "mean", "cutout": 16},
        "train": {"batch_size": 32, "loss": "kd", "lr": 0.02},
        "stages": {name: STAGES[name] for name in stages},
    }, "syncs.yaml")


def _syncs_in_steps(recipe, root: Path, out: Path, monkeypatch) -> list[str]:
    seen: list[str] = []

    class Located(HostSyncOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = len(self.seen)
            result = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.seen) > before:
                frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                          if "micronet" in f.filename]
                seen.append(f"{self.seen[-1]} at {' > '.join(frames[-3:])}")
            return result

    @contextlib.contextmanager
    def detect(mode, device):
        assert mode == "error"
        with Located():
            yield

    monkeypatch.setattr(loop, "_host_syncs_raise", detect)
    monkeypatch.setattr(augment, "SUBSET_ON_CPU", False)
    run_all(recipe, RunOptions(data_root=root, out=out, progress=False, eval_batch_size=200, sync_debug="error"))
    return seen


def test_float_kd_prune_and_fake_quant_act_steps_read_nothing_back(cifar10_root, tmp_path, monkeypatch):
    recipe = _recipe(["teacher", "student", "prune", "quant-act", "prune-fc"])
    assert _syncs_in_steps(recipe, cifar10_root, tmp_path / "run", monkeypatch) == []


def test_quant_weight_steps_read_nothing_back(cifar10_root, tmp_path, monkeypatch):
    recipe = _recipe(["teacher", "student", "quant-weight"])
    assert _syncs_in_steps(recipe, cifar10_root, tmp_path / "run", monkeypatch) == []
