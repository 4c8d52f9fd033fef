"""A recipe projection compresses an untrained model exactly as the real stages do (same compression layout),
and the FC stages touch only the classifier the model declares, never a SkipNet's gate controller."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.utils import parametrize

from micronet import io as mio
from micronet import models
from micronet.compress import compression_layout
from micronet.compress.state import weight_mask, weight_quantizer
from micronet.training import RunOptions, load_recipe, run_all
from micronet.training.projection import apply_projection, projection_from_recipe

BASE = {
    "name": "layout",
    "model": "densenet_bc:depth=10,growth=4",
    "seed": 0,
    "data": {"normalization": "cifar10", "holdout": 0},
    "augment": None,
    "train": {"batch_size": 4, "lr": 0.01, "loss": "ce"},  # the 12-image folder dataset: 3 steps per epoch
}

# Between them the chains use every value of every compression setting a recipe accepts.
CHAINS = {
    "defaults": {
        "prune": {"sparsity": 0.75},
        "quant-act": {},
        "quant-weight": {},
        "bn-recal": {"batches": 2},
        "prune-fc": {"sparsity": 0.5, "scope": "layer"},
        "quant-fc": {"weight_bits": 6},
    },
    "alternatives": {
        "prune": {"sparsity": 0.5, "scope": "layer", "mask_gradient": "masked", "block": [2, 2],
                  "mask_update_every": 1, "mask_update_until": 2},
        "quant-act": {"act_bits": 3, "act_calibration": "percentile", "calibration_batches": 2},
        "quant-weight": {"weight_bits": 5, "per_channel": False, "weight_refit": "step"},
        "prune-fc": {"sparsity": 0.25, "scope": "global", "mask_gradient": "masked", "block": [2, 4],
                     "mask_update_every": 1, "mask_update_until": 2},
        "quant-fc": {"weight_bits": 3, "per_channel": False, "weight_refit": "never"},
    },
    "mse-and-gaps": {  # no prune-fc: a recipe may leave stages out
        "prune": {"sparsity": 0.6, "block": [1, 4], "mask_update_every": 2, "mask_update_until": 1},
        "quant-act": {"act_bits": 8, "act_calibration": "mse"},
        "quant-weight": {"weight_bits": 2, "weight_refit": "never"},
        "quant-fc": {"weight_bits": 16, "weight_refit": "step"},
    },
}


def _recipe_file(path: Path, model: str, stages: dict, student: bool = True) -> Path:
    tree = copy.deepcopy(BASE)
    tree["model"] = model
    tree["stages"] = {**({"student": {"epochs": 1}} if student else {}),
                      **{name: {"epochs": 1, **s} if name != "bn-recal" else s for name, s in stages.items()}}
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_projection_and_real_stages_give_the_same_layout(chain, folder_root, tmp_path):
    stages = CHAINS[chain]
    recipe = load_recipe(_recipe_file(tmp_path / "full.yaml", BASE["model"], stages))
    out = tmp_path / "run"
    run_all(recipe, RunOptions(data_root=folder_root, out=out, progress=False))
    names = list(stages)
    for k, stage in enumerate(names):
        trained = compression_layout(mio.load(out / f"{stage}.safetensors").model)
        upto = _recipe_file(tmp_path / f"upto-{stage}.yaml", BASE["model"], {n: stages[n] for n in names[:k + 1]})
        projected = apply_projection(models.create(BASE["model"], num_classes=3), projection_from_recipe(str(upto)))
        assert compression_layout(projected) == trained, stage
    assert trained  # the chain compressed something


def test_fc_stages_leave_the_skipnet_gate_controller_alone(folder_root, tmp_path):
    model = "pyramidskipnet:depth=11,alpha=8"  # one gate, so one controller
    stages = {"bn-recal": {"batches": 2}, "prune-fc": {"sparsity": 0.5, "lr": 0.1},
              "quant-fc": {"weight_bits": 4, "lr": 0.1}}
    recipe = load_recipe(_recipe_file(tmp_path / "skip.yaml", model, stages, student=False))
    torch.manual_seed(0)
    start = mio.save(tmp_path / "untrained.safetensors", models.create(model, num_classes=3))  # no student run
    out = tmp_path / "run"
    options = RunOptions(data_root=folder_root, out=out, init_from=start, progress=False)
    results = {r.stage: r for r in run_all(recipe, options)}
    before = mio.load(out / "bn-recal.safetensors").model
    after = results["quant-fc"].model
    proj, proj_before = after.controller.proj, before.controller.proj
    assert not parametrize.is_parametrized(proj)
    assert weight_mask(proj) is None and weight_quantizer(proj) is None
    assert torch.equal(proj.weight, proj_before.weight) and torch.equal(proj.bias, proj_before.bias)
    assert not proj.weight.requires_grad  # frozen with the backbone: only the classifier trained
    # The classifier itself was pruned, quantized and trained.
    assert weight_mask(after.fc) is not None and weight_quantizer(after.fc) is not None
    assert after.fc.weight.requires_grad and not torch.equal(after.fc.bias, before.fc.bias)
    layout = compression_layout(after)
    assert set(layout) == {"fc"}
    assert layout["fc"]["mask"]["sparsity"] == 0.5 and layout["fc"]["weight_quant"]["bits"] == 4
    after_sd, before_sd = after.state_dict(), before.state_dict()
    backbone = [k for k in before_sd if not k.startswith("fc.")]
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in backbone)
