"""The eight-stage pipeline end to end on a tiny DenseNet and tiny learnable data (CPU, a few minutes at most).

One session-scoped run of ``run_all`` feeds the invariant checks; resume, DDP, divergence and bad-input
tests run single stages next to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from micronet import io as mio
from micronet.cli import main
from micronet.compress import state
from micronet.training import RunOptions, TrainingDiverged, load_recipe, run_all, run_stage
from micronet.training.stage_specs import STAGE_SPECS
from tests.threads import one_thread

#: The compression pipeline's stages (SkipNet's gate stages are tested in test_skipnet.py).
STAGES = tuple(name for name, spec in STAGE_SPECS.items() if spec.gates is None)

TINY = {
    "name": "tiny",
    "model": "densenet_bc:depth=10,growth=4",
    "teacher_model": "densenet_bc:depth=10,growth=8",
    "seed": 0,
    "data": {"normalization": "cifar10", "holdout": 0.1},
    "augment": {"policy": None, "crop_padding": 2, "flip": True, "cutout": 0},
    "train": {"batch_size": 32, "loss": "kd"},
    "stages": {
        "teacher": {"epochs": 3, "lr": 0.1, "warmup_epochs": 0.5, "warmup_start_lr": 0.01, "loss": "ce"},
        "student": {"epochs": 3, "lr": 0.1, "warmup_epochs": 0.5, "warmup_start_lr": 0.01, "loss": "ce"},
        "prune": {"epochs": 2, "lr": 0.02, "sparsity": 0.75, "mask_update_every": 5, "mask_update_until": 25},
        "quant-act": {"epochs": 1, "lr": 0.01, "act_bits": 4},
        "quant-weight": {"epochs": 1, "lr": 0.01, "weight_bits": 4},
        "bn-recal": {"batches": 8},
        "prune-fc": {"epochs": 1, "lr": 0.001, "sparsity": 0.5, "scope": "layer", "mask_update_every": 4,
                     "mask_update_until": 8},
        "quant-fc": {"epochs": 1, "lr": 0.001, "weight_bits": 4},
    },
}


def write_recipe(path: Path, tree: dict = TINY) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="session")
def pipeline(cifar10_root, tmp_path_factory):
    """``train-stage all`` on the tiny recipe: (out dir, results by stage)."""
    base = tmp_path_factory.mktemp("pipeline")
    recipe = load_recipe(write_recipe(base / "tiny.yaml"))
    with one_thread():
        results = run_all(recipe, RunOptions(data_root=cifar10_root, out=base / "run", progress=False))
    return base / "run", {r.stage: r for r in results}


def _sd(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return mio.load(out / f"{stage}.safetensors").model.state_dict()


def test_every_stage_writes_a_complete_checkpoint_with_its_history(pipeline):
    out, results = pipeline
    assert list(results) == list(STAGES)
    for i, stage in enumerate(STAGES):
        ck = mio.load(out / f"{stage}.safetensors")
        stages = [h["stage"] for h in ck.history]
        expected = ["teacher"] if stage == "teacher" else [s for s in STAGES[1 : i + 1]]
        assert stages == expected and all(h["complete"] for h in ck.history)
        assert ck.extra["training"]["complete"] and not ck.extra_tensors  # no resume state left in the result
        log = [json.loads(line) for line in (out / f"{stage}.jsonl").read_text().splitlines()]
        assert log[0]["event"] == "start" and log[-1]["event"] == "done"
        assert log[0]["fingerprint"] == ck.extra["provenance"]["fingerprint"] == ck.history[-1]["fingerprint"]
        if stage != "bn-recal":
            assert len(log) == TINY["stages"][stage]["epochs"] + 2  # "start", one line per epoch, "done"


def test_prune_reaches_the_exact_global_conv_sparsity(pipeline):
    model = mio.load(pipeline[0] / "prune.safetensors").model
    convs = state.select_layers(model, ("conv",))
    total = sum(m.weight.numel() for _, m in convs)
    pruned = sum(int((~state.weight_mask(m).mask).sum()) for _, m in convs)
    zeros = sum(int((m.weight == 0).sum()) for _, m in convs)
    assert pruned == round(0.75 * total) and zeros == pruned
    assert all(state.weight_mask(m).frozen for _, m in convs)
    assert state.weight_mask(model.fc) is None


def test_quant_act_and_quant_weight_put_quantizers_where_the_spec_says(pipeline):
    out = pipeline[0]
    act = mio.load(out / "quant-act.safetensors").model
    convs = state.select_layers(act, ("conv",))
    assert state.input_quantizer(act.conv_stem) is None  # the image stays float
    assert all(state.input_quantizer(m).bits == 4 for n, m in convs if n != "conv_stem")
    model = mio.load(out / "quant-weight.safetensors").model
    for _, m in state.select_layers(model, ("conv",)):
        q = state.weight_quantizer(m)
        assert q.bits == 4
        rows = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert max(len(torch.unique(r)) for r in rows) <= 16
        assert bool((m.weight[~state.weight_mask(m).mask] == 0).all())  # pruned stays zero
    assert state.weight_quantizer(model.fc) is None


def test_bn_recal_changes_bn_statistics_and_nothing_else(pipeline):
    before, after = _sd(pipeline[0], "quant-weight"), _sd(pipeline[0], "bn-recal")
    assert before.keys() == after.keys()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    for k in before:
        if k not in stats and not k.endswith("num_batches_tracked"):
            assert torch.equal(before[k], after[k]), k


def test_fc_stages_keep_the_backbone_bit_identical(pipeline):
    out = pipeline[0]
    recal, prune_fc, quant_fc = (_sd(out, s) for s in ("bn-recal", "prune-fc", "quant-fc"))
    for k, v in recal.items():
        if not k.startswith("fc."):
            assert torch.equal(v, prune_fc[k]) and torch.equal(v, quant_fc[k]), k
    assert not torch.equal(recal["fc.bias"], quant_fc["fc.bias"])  # the FC did train
    fc = mio.load(out / "quant-fc.safetensors").model.fc
    mask = state.weight_mask(fc).mask
    assert int((~mask).sum()) == fc.weight.numel() // 2  # exactly 50% of the FC pruned
    assert state.weight_quantizer(fc).bits == 4
    rows = fc.weight.detach()
    assert max(len(torch.unique(r)) for r in rows) <= 16 and bool((rows[~mask] == 0).all())


def test_accuracy_is_far_above_chance_and_the_score_drops(pipeline):
    out, results = pipeline
    assert results["teacher"].metrics["test_top1"] > 40
    assert results["quant-fc"].metrics["test_top1"] > 30  # 10 classes: chance is 10%
    assert results["quant-fc"].metrics["val_top1"] > 30
    from micronet.io import load_model
    from micronet.scoring import score

    dense = score(load_model(out / "student.safetensors")).score
    final = score(load_model(out / "quant-fc.safetensors")).score
    assert final < 0.5 * dense


def test_all_resumes_by_skipping_finished_stages(pipeline, cifar10_root):
    out, _ = pipeline
    recipe = load_recipe(write_recipe(out.parent / "tiny.yaml"))
    results = run_all(recipe, RunOptions(data_root=cifar10_root, out=out, progress=False))
    assert all(r.skipped for r in results)


def test_eval_cli_matches_the_recorded_test_accuracy(pipeline, cifar10_root):
    out, results = pipeline
    r = CliRunner().invoke(main, ["eval", str(out / "quant-fc.safetensors"), "--data-root", str(cifar10_root),
                                  "--json"])
    assert r.exit_code == 0, r.output
    reported = json.loads(r.output)
    assert reported["top1"] == pytest.approx(results["quant-fc"].metrics["test_top1"])
    assert reported["normalization"] == "cifar10" and reported["images"] == 200


class _Kill(Exception):
    pass


def test_killed_stage_resumes_to_identical_weights(pipeline, cifar10_root, tmp_path):
    out, _ = pipeline
    recipe = load_recipe(write_recipe(tmp_path / "tiny.yaml"))
    base = RunOptions(data_root=cifar10_root, out=tmp_path / "a", init_from=out / "student.safetensors",
                      teacher=out / "teacher.safetensors", progress=False)
    straight = run_stage("prune", recipe, base)

    def kill(step: int, model) -> None:
        if step == 23:  # epoch 2 of 2, mid-epoch, between two mask refreshes
            raise _Kill()

    interrupted = dataclasses.replace(base, out=tmp_path / "b", after_step=kill)
    with pytest.raises(_Kill):
        run_stage("prune", recipe, interrupted)
    partial = mio.load(tmp_path / "b" / "prune.safetensors")
    assert partial.extra["training"]["epochs_done"] == 1 and partial.extra_tensors  # epoch-1 state kept
    resumed = run_stage("prune", recipe, dataclasses.replace(base, out=tmp_path / "b", resume=True))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["test_top1"] == straight.metrics["test_top1"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pipeline, cifar10_root, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.yaml"))

    def poison(step: int, model) -> None:
        if step == 20:  # in epoch 2
            with torch.no_grad():
                model.fc.bias.fill_(float("nan"))

    options = RunOptions(data_root=cifar10_root, out=tmp_path / "run", progress=False, after_step=poison)
    with pytest.raises(TrainingDiverged, match="non-finite.*epoch 2.*last good checkpoint"):
        run_stage("student", recipe, options)
    kept = mio.load(tmp_path / "run" / "student.safetensors")
    assert kept.extra["training"]["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in kept.model.state_dict().values() if v.is_floating_point())


DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from micronet.training import RunOptions, load_recipe, run_stage

torch.set_num_threads(1)
root, out, recipe = map(Path, sys.argv[1:4])
result = run_stage("student", load_recipe(recipe, {"epochs": 1}),
                   RunOptions(data_root=root, out=out, progress=False))
rank = dist.get_rank()
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
dist.destroy_process_group()
"""


def test_two_process_gloo_ddp_keeps_replicas_identical(cifar10_root, tmp_path):
    script = tmp_path / "ddp_student.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    recipe = write_recipe(tmp_path / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(cifar10_root), str(tmp_path / "out"), str(recipe)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ck = mio.load(tmp_path / "out" / "student.safetensors")
    assert ck.history[-1]["world_size"] == 2 and ck.extra["training"]["complete"]
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, r0[k]), k


def _cli(*args: str):
    return CliRunner().invoke(main, ["train-stage", *args])


def test_bad_inputs_fail_before_training_with_one_line(pipeline, cifar10_root, tmp_path):
    out, _ = pipeline
    recipe = str(write_recipe(tmp_path / "tiny.yaml"))
    cases = [
        (["student", "--recipe", recipe, "--data-root", str(tmp_path / "missing")], "does not exist"),
        (["student", "--recipe", recipe, "--data-root", str(tmp_path)], "holds no dataset: expected cifar-100"),
        (["quant-act", "--recipe", recipe, "--data-root", str(cifar10_root), "--from", str(out / "student.safetensors"),
          "--teacher", str(out / "teacher.safetensors")], "written by stage 'student'; stage 'quant-act' starts from"),
        (["prune", "--recipe", recipe, "--data-root", str(cifar10_root), "--from", str(out / "student.safetensors"),
          "--teacher", str(out / "teacher.safetensors"), "--model", "densenet_bc:depth=16,growth=4"],
         "but the recipe trains"),
        (["prune", "--recipe", recipe, "--data-root", str(cifar10_root), "--from", str(out / "student.safetensors")],
         "pass --teacher"),
        (["prune", "--recipe", recipe, "--data-root", str(cifar10_root)], "pass --from"),
        (["student", "--recipe", recipe, "--data-root", str(cifar10_root), "--set", "stages.student.lr=-1"],
         "lr must be positive"),
        (["student", "--recipe", recipe, "--data-root", str(cifar10_root), "--model", "resnet9000"], "unknown model"),
    ]
    for args, message in cases:
        r = _cli(*args, "--out", str(tmp_path / "never"), "--no-progress")
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())


def test_cli_runs_a_stage_with_overrides(cifar10_root, tmp_path):
    recipe = str(write_recipe(tmp_path / "tiny.yaml"))
    with one_thread():
        r = _cli("student", "--recipe", recipe, "--data-root", str(cifar10_root), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "student.safetensors" in r.output and "test top-1 %" in r.output and "trained" in r.output
    entry = mio.load(tmp_path / "o" / "student.safetensors").history[-1]
    assert (entry["settings"]["epochs"], entry["settings"]["batch_size"], entry["settings"]["lr"]) == (1, 64, 0.05)


def test_eval_cli_reads_riair2019_files_with_the_legacy_scaling(cifar100_root, tmp_path):
    from micronet.io.riair2019 import random_riair2019_state

    path = tmp_path / "densenet-100.pth.tar"
    torch.save(random_riair2019_state(), path)
    with one_thread():
        r = CliRunner().invoke(main, ["eval", str(path), "--data-root", str(cifar100_root), "--json"])
    assert r.exit_code == 0, r.output
    reported = json.loads(r.output)
    assert reported["format"] == "riair2019" and reported["normalization"] == "riair2019"
    assert reported["images"] == 100 and 0 <= reported["top1"] <= reported["top5"] <= 100


def test_select_best_keeps_the_best_epoch_on_the_held_out_split(cifar10_root, tmp_path):
    tree = {**TINY, "stages": {"student": {**TINY["stages"]["student"], "select": "best"}}}
    recipe = load_recipe(write_recipe(tmp_path / "best.yaml", tree))
    with one_thread():
        result = run_stage("student", recipe, RunOptions(data_root=cifar10_root, out=tmp_path / "o", progress=False))
    epochs = [json.loads(line) for line in (tmp_path / "o" / "student.jsonl").read_text().splitlines()][1:-1]
    best = max(epochs, key=lambda e: e["val_top1"])  # first maximum, as the stage keeps it
    assert result.metrics["selected_epoch"] == best["epoch"]
    assert result.metrics["val_top1"] == pytest.approx(best["val_top1"])
    assert not (tmp_path / "o" / "student.best.safetensors").exists()


def test_unknown_device_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from micronet.cli import main

    for device in ("gpu", "cuda:99"):
        res = CliRunner().invoke(main, ["train-stage", "student", "--recipe", "micronet2019-densenet",
                                        "--data-root", str(tmp_path), "--device", device])
        assert res.exit_code == 2 and res.output.startswith("error:") and res.output.count("\n") == 1, res.output
