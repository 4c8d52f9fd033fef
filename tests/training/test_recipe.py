"""Recipes: the shipped ones load with the published values; bad keys and values fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from micronet.errors import MicronetError
from micronet.training.recipe import available_recipes, load_recipe, parse_recipe
from micronet.training.stage_specs import STAGE_SPECS

#: The compression pipeline's stages (SkipNet's gate stages are tested in test_skipnet.py).
STAGES = tuple(name for name, spec in STAGE_SPECS.items() if spec.gates is None)


def test_shipped_densenet_recipe_holds_the_winners_schedule():
    r = load_recipe("micronet2019-densenet")
    assert r.chain == list(STAGES) and r.model == "densenet100_k12" and r.teacher_model == "densenet172_k30"
    epochs = [r.stages[s].epochs for s in STAGES if s != "bn-recal"]
    assert epochs == [300, 300, 300, 300, 300, 50, 50]
    assert r.stages["student"].lr == 0.1 and r.stages["student"].warmup_epochs == 5
    assert r.stages["student"].warmup_start_lr == 0.001 and r.stages["student"].loss == "ce"
    assert r.stages["prune"].lr == 0.001 and r.stages["prune"].sparsity == 0.75
    assert r.stages["prune-fc"].lr == 1e-4 and r.stages["prune-fc"].sparsity == 0.5
    assert r.stages["quant-act"].act_bits == 4 and r.stages["quant-fc"].weight_bits == 4
    kd = r.stages["quant-weight"].kd
    assert (kd.direction, kd.temperature, r.stages["quant-weight"].loss) == ("reverse", 1.0, "kd")
    assert all(r.stages[s].batch_size == 64 for s in STAGES)
    assert all(r.stages[s].momentum == 0.9 for s in STAGES if s != "bn-recal")  # bn-recal has no optimizer
    assert r.augment.policy == "micronet2019" and r.augment.cutout == 16


def test_shipped_pyramidnet_recipe_holds_fast_aa_values():
    r = load_recipe("pyramidnet272-fastaa")
    s = r.stages["student"]
    assert (s.batch_size, s.lr, s.warmup_epochs, s.nesterov, s.weight_decay, s.grad_clip) == (
        64, 0.05, 5, True, 5e-5, 5.0)
    assert r.augment.cutout == 16 and r.normalization == "fastaa"
    assert set(available_recipes()) >= {"micronet2019-densenet", "pyramidnet272-fastaa"}


@pytest.mark.parametrize(("name", "model", "epochs", "lr", "wd", "batch"), [
    # The AutoAugment study's settings (issue: WRN 200/0.1/5e-4/128; Shake-Shake 1800/0.01/1e-3/128;
    # PyramidNet+ShakeDrop 1800/0.05/5e-5/64), gradient clip 5, AutoAugment's CIFAR-10 policy + Cutout 16.
    ("autoaugment-wrn28-10", "wrn28_10", 200, 0.1, 5e-4, 128),
    ("autoaugment-shakeshake26", "shakeshake26_2x96d", 1800, 0.01, 1e-3, 128),
    ("autoaugment-pyramidnet272", "pyramidnet272_a200", 1800, 0.05, 5e-5, 64),
])
def test_shipped_autoaugment_recipes_hold_the_study_settings(name, model, epochs, lr, wd, batch):
    r = load_recipe(name)
    s = r.stages["student"]
    assert r.model == model and (s.epochs, s.lr, s.weight_decay, s.batch_size, s.grad_clip) == (
        epochs, lr, wd, batch, 5.0)
    assert r.augment.policy == "autoaugment-cifar10" and r.augment.cutout == 16 and r.augment.crop_padding == 4
    assert (r.augment.fill, r.augment.pad_fill) == ("mean", "mean")  # zero in normalised space
    assert r.normalization == "train-stats"


def test_repository_recipes_folder_points_at_the_packaged_files():
    root = Path(__file__).resolve().parents[2] / "recipes"
    for name in available_recipes():
        assert (root / f"{name}.yaml").resolve() == Path(load_recipe(name).source).resolve()


def test_cli_overrides_apply_before_validation():
    r = load_recipe("micronet2019-densenet", {"epochs": 3, "lr": 0.02, "model": "densenet_bc:depth=40,growth=12"},
                    ["stages.quant-fc.weight_bits=6", "augment.ops_per_image=2"])
    assert r.stages["teacher"].epochs == 3 and r.stages["teacher"].warmup_epochs == pytest.approx(0.05)
    assert r.stages["prune"].lr == 0.02 and r.stages["quant-fc"].weight_bits == 6
    assert r.model == "densenet_bc:depth=40,growth=12" and r.augment.ops_per_image == 2
    only = load_recipe("micronet2019-densenet", {"epochs": 2, "stages_only": ["prune"]})
    assert only.stages["prune"].epochs == 2 and only.stages["student"].epochs == 300


def _write(tmp_path, tree) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


BASE = {"model": "densenet_bc:depth=10,growth=4", "stages": {"student": {"epochs": 2}}}


@pytest.mark.parametrize("change, message", [
    ({"stages": {"student": {"epochs": 2, "sparsity": 0.5}}}, "unknown key 'sparsity'"),
    ({"stagez": {}}, "unknown key 'stagez'"),
    ({"stages": {"distill": {}}}, "unknown stage 'distill'"),
    ({"stages": {"student": {"epochs": 2, "warmup_epochs": 2}}}, "warmup_epochs"),
    ({"stages": {"prune": {"sparsity": 1.5}}}, "sparsity must be in"),
    ({"stages": {"teacher": {"loss": "kd"}}, "teacher_model": "x"}, "cannot distil from itself"),
    ({"stages": {"quant-fc": {"weight_bits": 1}}}, "weight_bits must be an integer in 2..16"),
    ({"stages": {"quant-act": {"act_bits": 17}}}, "act_bits must be an integer in 2..16"),
    ({"stages": {"quant-act": {"act_calibration": "median"}}}, "act_calibration"),
    ({"stages": {"quant-weight": {"weight_refit": "always"}}}, "weight_refit"),
    ({"stages": {"prune": {"sparsity": 0.5, "block": [2]}}}, "block must be"),
    ({"stages": {"prune": {"sparsity": 0.5, "block": [2, 0]}}}, "block must be"),
    ({"stages": {"prune": {"sparsity": 0.5, "mask_gradient": "none"}}}, "mask gradient"),
    ({"stages": {"prune": {}}}, "sparsity must be in \\(0, 1\\)"),
    ({"stages": {"bn-recal": {"epochs": 3}}}, "unknown key 'epochs'"),
    ({"stages": {"student": {"epochs": "ten"}}}, "epochs must be int"),
    ({"stages": {"student": {"select": "best"}}}, "held-out split"),
    ({"stages": {"student": {"kd": {"direction": "sideways"}}}}, "direction"),
    ({"augment": {"policy": "no-such-policy"}}, "neither a file nor a shipped policy"),
    ({"data": {"normalization": "imagenet"}}, "normalization"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, change, message):
    with pytest.raises(MicronetError, match=message) as info:
        load_recipe(_write(tmp_path, {**BASE, **change}))
    assert "\n" not in str(info.value)


def test_holdout_is_a_fraction_or_a_whole_count_and_counts_stay_integers(tmp_path):
    count = load_recipe(_write(tmp_path, {**BASE, "data": {"holdout": 5000}}))
    assert count.holdout == 5000 and isinstance(count.holdout, int) and str(count.holdout) == "5000"
    whole = load_recipe(_write(tmp_path, {**BASE, "data": {"holdout": 5000.0}}))  # YAML `5000.0` is a count too
    assert isinstance(whole.holdout, int) and whole.holdout == 5000
    fraction = load_recipe(_write(tmp_path, {**BASE, "data": {"holdout": 0.1}}))
    assert fraction.holdout == 0.1 and isinstance(fraction.holdout, float)
    for bad in ("5k", 2.5, -1, True):
        with pytest.raises(MicronetError, match="data.holdout must be a fraction below 1 or a whole image") as info:
            load_recipe(_write(tmp_path, {**BASE, "data": {"holdout": bad}}))
        assert "float" not in str(info.value)


def test_unknown_recipe_name_and_bad_set(tmp_path):
    with pytest.raises(MicronetError, match="micronet2019-densenet"):
        load_recipe("no-such-recipe")
    with pytest.raises(MicronetError, match="KEY=VALUE"):
        load_recipe(_write(tmp_path, BASE), sets=["stages.student.epochs"])


def test_augment_cuda_graph_is_a_boolean_option():
    base = {"model": "densenet_bc:depth=10,growth=4", "stages": {"student": {"epochs": 1}}}
    assert parse_recipe({**base, "augment": {"cuda_graph": True}}).augment.cuda_graph is True
    with pytest.raises(MicronetError, match="cuda_graph must be true or false"):
        parse_recipe({**base, "augment": {"cuda_graph": "yes"}})


def test_bn_recal_is_one_pass_by_default_and_scales_with_epochs_relative_to_the_stage_before(tmp_path):
    from micronet.training.recipe import resolve_recipe

    full = load_recipe("micronet2019-densenet").stage("bn-recal")
    # the winner: one forward epoch over the training split; 45,000 images / 64 per batch = 703.1 -> 704 batches
    assert full.passes == 1 and full.batch_count(45_000) == 704
    # --epochs 1: quant-weight (the stage before) goes 300 -> 1 epochs, so bn-recal 1 -> 1/300 pass = 3 batches
    short = load_recipe("micronet2019-densenet", {"epochs": 1}).stage("bn-recal")
    assert short.passes == pytest.approx(1 / 300) and short.batch_count(45_000) == 3
    assert load_recipe("micronet2019-densenet", {"epochs": 600}).stage("bn-recal").batch_count(45_000) == 1407
    # an explicit batch count scales by the same factor
    text = resolve_recipe("micronet2019-densenet").read_text().replace("{passes: 1}", "{batches: 700}")
    (tmp_path / "explicit.yaml").write_text(text)
    assert load_recipe(tmp_path / "explicit.yaml", {"epochs": 150}).stage("bn-recal").batch_count(45_000) == 350
