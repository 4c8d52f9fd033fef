"""SkipNet's two stages (skip-sp, skip-rl): the policy-gradient loss on hand-made episodes, gate modes,
the RL stage skipping a useless block and keeping a useful one, resume, reports and bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from micronet import io as mio
from micronet.cli import main
from micronet.errors import MicronetError
from micronet.io import checkpoint_test_images
from micronet.models import GateStats, create, registry
from micronet.scoring import score
from micronet.training import RunOptions, load_recipe, run_all, run_stage
from micronet.training.skip_rl import gate_returns, policy_gradient_loss
from tests.threads import one_thread
from tests.training.gated_toy import ToyGatedNet


@pytest.fixture(scope="module", autouse=True)
def _toy_family():
    """The toy is a model family while these tests run (checkpoints rebuild it by name), and only then."""
    registry.register_family("toygated")(ToyGatedNet)
    yield
    registry._FAMILIES.pop("toygated")


# ----------------------------------------------------------------------------------------------- the loss
def test_returns_and_loss_of_a_hand_made_episode():
    # two gates, two images; image 0 runs gate 0 and skips gate 1, image 1 skips both
    actions = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    probs = torch.tensor([[0.8, 0.4], [0.3, 0.6]], requires_grad=True)
    ce = torch.tensor([0.5, 2.0])
    alpha, gamma = 0.2, 0.9
    r = alpha / 2  # per skipped gate
    # image 0: r_0 = 0, r_1 = 0.1; R_1 = 0.1 + 0.9 * -0.5 = -0.35; R_0 = 0 + 0.9 * -0.35 = -0.315
    # image 1: r_0 = r_1 = 0.1; R_1 = 0.1 + 0.9 * -2 = -1.7; R_0 = 0.1 + 0.9 * -1.7 = -1.43
    expected_returns = torch.tensor([[-0.315, -1.43], [-0.35, -1.7]])
    assert torch.allclose(gate_returns(actions, -ce, alpha, gamma), expected_returns)
    assert r == pytest.approx(0.1)
    log_pi = torch.tensor([[math.log(0.8), math.log(0.6)], [math.log(0.7), math.log(0.4)]])
    # per image: -(log 0.8 * -0.315 + log 0.7 * -0.35) and -(log 0.6 * -1.43 + log 0.4 * -1.7)
    image_0 = 0.315 * math.log(0.8) + 0.35 * math.log(0.7)
    image_1 = 1.43 * math.log(0.6) + 1.7 * math.log(0.4)
    expected = -(log_pi * expected_returns).sum(0).mean()
    assert expected.item() == pytest.approx((image_0 + image_1) / 2)
    loss = policy_gradient_loss(probs, actions, ce, alpha, gamma, reduction="mean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # "sum" (the default, official SkipNet's action.reinforce): the images' terms added, batch-size times "mean"
    summed = policy_gradient_loss(probs, actions, ce, alpha, gamma)
    assert summed.item() == pytest.approx(image_0 + image_1, rel=1e-6)
    # and so are the gradients: d/dp of -log pi * R is -R/p for a run gate, R/(1 - p) for a skipped one
    summed.backward()
    expected_grad = torch.tensor([[0.315 / 0.8, -1.43 / 0.6], [-0.35 / 0.7, -1.7 / 0.4]])
    assert torch.allclose(probs.grad, expected_grad)
    probs.grad = None
    policy_gradient_loss(probs, actions, ce, alpha, gamma, reduction="mean").backward()
    assert torch.allclose(probs.grad, expected_grad / 2)
    with pytest.raises(ValueError, match="reduction"):
        policy_gradient_loss(probs, actions, ce, alpha, gamma, reduction="max")
    # gamma = 1 (the default): returns are plain sums of the rewards still to come
    assert torch.allclose(gate_returns(actions, -ce, alpha), torch.tensor([[-0.4, -1.8], [-0.4, -1.9]]))


def test_a_skip_that_paid_off_is_reinforced_and_one_that_hurt_is_discouraged():
    # one gate, p = 0.5; the image skipped it. With alpha 1 the skip earns 1; the return is 1 - CE.
    for ce, sign in ((0.1, +1), (3.0, -1)):
        p = torch.tensor([[0.5]], requires_grad=True)
        policy_gradient_loss(p, torch.zeros(1, 1), torch.tensor([ce]), alpha=1.0).backward()
        # gradient descent moves p by -grad: a paid-off skip lowers p (more skipping), a costly one raises it
        assert torch.sign(p.grad).item() == sign
    # only log pi carries gradient: the CE passed in is treated as a constant reward
    ce = torch.tensor([1.0], requires_grad=True)
    policy_gradient_loss(torch.tensor([[0.5]], requires_grad=True), torch.ones(1, 1), ce, alpha=1.0).backward()
    assert ce.grad is None


# ----------------------------------------------------------------------------------------------- gate modes
def _fixed_probs_model(prob: float):
    torch.manual_seed(0)
    model = create("pyramidskipnet:depth=20,alpha=12", num_classes=10)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.tensor(math.log(prob / (1 - prob))))

        def forward(self, features, state):
            return torch.sigmoid(self.logit).expand(features.shape[0]), state

    model.controller = Fixed()
    return model


def test_training_gates_sample_in_skip_rl_and_threshold_otherwise():
    model = _fixed_probs_model(0.7)
    x = torch.randn(400, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model(x[:8])
    assert all(bool((m == 1).all()) for m in model.gate_masks)  # eval: 1[p > 0.5]
    model.train()
    model.gate_sampling = True  # what skip-rl's set_mode does
    torch.manual_seed(1)
    model(x[:200])
    masks = torch.stack(model.gate_masks)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert abs(masks.mean().item() - 0.7) < 0.06  # Bernoulli(0.7) over 3 gates x 200 images
    assert not masks.requires_grad  # sampled actions pass no gradient: REINFORCE trains the gates
    assert torch.allclose(torch.stack(model.gate_probs), torch.tensor(0.7))
    model.gate_sampling = False  # skip-sp: hard gates with the straight-through estimator
    model(x[:8])
    assert all(bool((m == 1).all()) for m in model.gate_masks)
    model.gate_penalty().backward()
    assert model.controller.logit.grad is not None and model.controller.logit.grad.item() > 0
    model.eval()
    model.gate_sampling = True  # sampling applies to training only: eval still thresholds
    with torch.no_grad():
        model(x[:8])
    assert all(bool((m == 1).all()) for m in model.gate_masks)


# ----------------------------------------------------------------------------------------------- the stages
TOY = {
    "name": "toy-skipnet", "model": "toygated", "seed": 0,
    "data": {"normalization": "cifar10", "holdout": 0.1},
    "augment": None,
    "train": {"batch_size": 32, "weight_decay": 0.0},
    # rl_weight 1/32 on the batch sum (= 1 on the batch mean at batch 32) and lr 0.05 (not the paper's 0.01 and
    # 1e-4) so a few hundred steps suffice on the toy
    "stages": {"skip-sp": {"epochs": 3, "lr": 0.05},
               "skip-rl": {"epochs": 12, "lr": 0.05, "alpha": 2.0, "rl_weight": 1 / 32}},
}


def _recipe(path, **rl):
    tree = {**TOY, "stages": {**TOY["stages"], "skip-rl": {**TOY["stages"]["skip-rl"], **rl}}}
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path)


@pytest.fixture(scope="module")
def pretrained(cifar10_root, tmp_path_factory):
    """skip-sp on the toy: (its checkpoint, its result)."""
    base = tmp_path_factory.mktemp("skipsp")
    with one_thread():  # module fixtures run before the per-test one-thread fixture
        result = run_stage("skip-sp", _recipe(base / "toy.yaml"), RunOptions(data_root=cifar10_root, out=base,
                                                                              progress=False))
    return result.path, result


def _skip_rl(cifar10_root, pretrained, out, **rl):
    recipe = _recipe(out.parent / f"{out.name}.yaml", **rl)
    return run_stage("skip-rl", recipe, RunOptions(data_root=cifar10_root, out=out, init_from=pretrained[0],
                                                    progress=False))


@pytest.fixture(scope="module")
def rl_trained(cifar10_root, pretrained, tmp_path_factory):
    """skip-rl with alpha 2 (216 steps) from the skip-sp checkpoint."""
    with one_thread():
        return _skip_rl(cifar10_root, pretrained, tmp_path_factory.mktemp("skiprl") / "run")


def test_skip_sp_trains_with_hard_gates_and_logs_them(pretrained):
    path, result = pretrained
    gates = result.metrics["test_gates"]
    assert result.metrics["test_top1"] > 60  # learnable blobs, 10 classes
    assert gates["images"] == 200 and len(gates["gate_rates"]) == 2
    assert sum(gates["executed_blocks_hist"]) == 200
    log = [json.loads(line) for line in (path.parent / "skip-sp.jsonl").read_text().splitlines()]
    epochs = [record for record in log if record.get("event") != "start"]  # the first line says what started
    assert epochs and all("val_gates" in record for record in epochs)  # per epoch, on the held-out split
    assert "test_gates" in log[-1] and log[-1]["event"] == "done"


def test_skip_rl_learns_to_skip_the_useless_block_and_keep_the_useful_one(rl_trained, pretrained):
    useful, useless = rl_trained.metrics["test_gates"]["gate_rates"]
    assert 1 - useless > 0.9 and 1 - useful < 0.1  # skip rates
    assert rl_trained.metrics["test_top1"] >= pretrained[1].metrics["test_top1"] - 5
    history = mio.read_header(rl_trained.path)["history"]
    assert [h["stage"] for h in history] == ["skip-sp", "skip-rl"]


def test_a_larger_alpha_skips_more(cifar10_root, pretrained, tmp_path):
    skipped = []
    for alpha in (0.5, 2.0, 8.0):
        result = _skip_rl(cifar10_root, pretrained, tmp_path / f"a{alpha}", alpha=alpha)
        skipped.append(1 - sum(result.metrics["test_gates"]["gate_rates"]) / 2)
    assert skipped == sorted(skipped) and skipped[-1] - skipped[0] > 0.5, skipped


class _Kill(Exception):
    pass


def test_killed_skip_rl_resumes_bit_identically(cifar10_root, pretrained, rl_trained, tmp_path):
    def kill(step: int, model) -> None:
        if step == 100:  # epoch 6 of 12, mid-epoch
            raise _Kill()

    recipe = _recipe(tmp_path / "toy.yaml")
    options = RunOptions(data_root=cifar10_root, out=tmp_path / "b", init_from=pretrained[0], progress=False)
    with pytest.raises(_Kill):
        run_stage("skip-rl", recipe, dataclasses.replace(options, after_step=kill))
    resumed = run_stage("skip-rl", recipe, dataclasses.replace(options, resume=True))
    a, b = rl_trained.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["test_gates"] == rl_trained.metrics["test_gates"]


def test_eval_cli_reports_the_gates(rl_trained, cifar10_root, tmp_path):
    plot = tmp_path / "gates.png"
    r = CliRunner().invoke(main, ["eval", str(rl_trained.path), "--data-root", str(cifar10_root), "--json",
                                  "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    reported = json.loads(r.output)
    assert reported["top1"] == pytest.approx(rl_trained.metrics["test_top1"])
    assert reported["gates"] == rl_trained.metrics["test_gates"]
    assert plot.stat().st_size > 0
    text = CliRunner().invoke(main, ["eval", str(rl_trained.path), "--data-root", str(cifar10_root)]).output
    assert "executed blocks" in text and "MACs per image" in text


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    ({"model": "densenet_bc:depth=10,growth=4"}, "stage 'skip-sp' trains SkipNet gates, but DenseNet has none"),
    ({"stages": {"skip-rl": {"alpha": -0.1}}}, "alpha .* must be non-negative"),
    ({"stages": {"skip-rl": {"gamma": 1.5}}}, "gamma in \\[0, 1\\]"),
    ({"stages": {"skip-rl": {"alpha": math.nan}}}, "alpha and rl_weight must be finite"),
    ({"stages": {"skip-rl": {"alpha": math.inf}}}, "alpha and rl_weight must be finite"),
    ({"stages": {"skip-rl": {"rl_weight": math.nan}}}, "alpha and rl_weight must be finite"),
    ({"stages": {"skip-rl": {"rl_weight": math.inf}}}, "alpha and rl_weight must be finite"),
    ({"stages": {"skip-rl": {"rl_reduction": "max"}}}, "rl_reduction must be one of sum, mean, got 'max'"),
])
def test_bad_gate_recipes_fail_in_one_line_before_training(tmp_path, change, message):
    tree = {**TOY, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(MicronetError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_shipped_recipes_reduce_the_rl_term_as_their_sources_did():
    # official SkipNet (cifar/train_rl.py) sums REINFORCE over the batch; the PyramidNet entry averages it
    official = load_recipe("skipnet-pyramidnet272").stage("skip-rl")
    entry = load_recipe("skipnet-pyramidnet272-compressed").stage("skip-rl")
    assert (official.rl_reduction, official.rl_weight, official.alpha) == ("sum", 0.01, 0.1)
    assert (entry.rl_reduction, entry.rl_weight, entry.alpha) == ("mean", 0.01, 0.1)


def test_skip_rl_from_a_plain_checkpoint_fails_before_training(cifar10_root, tmp_path):
    plain = {**TOY, "model": "densenet_bc:depth=10,growth=4", "stages": {"student": {"epochs": 1}}}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(plain))
    (student,) = run_all(load_recipe(path), RunOptions(data_root=cifar10_root, out=tmp_path / "p", progress=False))
    r = CliRunner().invoke(main, ["train-stage", "skip-rl", "--recipe", str(_recipe(tmp_path / "t.yaml").source),
                                  "--data-root", str(cifar10_root), "--out", str(tmp_path / "q"),
                                  "--from", str(student.path), "--model", "densenet_bc:depth=10,growth=4"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "trains SkipNet gates" in r.output and not (tmp_path / "q" / "skip-rl.safetensors").exists()


# ----------------------------------------------------------------------------------------------- scoring
def test_dynamic_score_is_below_the_all_open_score_by_the_skipped_macs(rl_trained, cifar10_root):
    images = checkpoint_test_images(rl_trained.path, cifar10_root, 100)
    model = mio.load(rl_trained.path).model.eval()
    report = score(model, data=images, samples=100)
    dynamic = report.to_dict()["dynamic"]
    assert dynamic["label"] == "mean over 100 real test images" and dynamic["images"] == 100
    # the MAC fraction the gates skipped on the same images, from the model's decisions (no scorer involved)
    stats = GateStats.for_model(model)
    with torch.no_grad():
        model(images)
    stats.update(model.executed())
    skipped = stats.summary()["macs_skipped_fraction"]
    assert skipped > 0.05  # the useless block is skipped
    saved = 1 - float(report.ops) / dynamic["worst_case_ops"]
    # within 1 point: ops also hold what MACs leave out (the stem's ReLU and pooling, the block's x0 and add)
    assert saved == pytest.approx(skipped, abs=0.01)
    assert dynamic["worst_case_score"] - report.score == pytest.approx(saved * dynamic["worst_case_op_score"])
    # the gate network (two 1x1 convs, the LSTM, its Linear) is reported apart and is part of the totals
    assert 0 < dynamic["gate_network_params"] < float(report.params)
    assert len(dynamic["ops_per_example"]) == 100
    assert sum(dynamic["ops_per_example"]) / 100 == pytest.approx(float(report.ops))


def test_synthetic_inputs_are_labelled_an_estimate(rl_trained):
    report = score(mio.load(rl_trained.path).model, samples=4)
    assert report.to_dict()["dynamic"]["label"].startswith("estimate over 4 images")
    assert "dynamic score: estimate over 4 images" in report.table()


def test_score_cli_reports_and_plots_the_dynamic_compute(rl_trained, cifar10_root, tmp_path):
    plot = tmp_path / "score.png"
    r = CliRunner().invoke(main, ["score", str(rl_trained.path), "--data-root", str(cifar10_root), "--samples", "20",
                                  "--plot", str(plot), "--json"])
    assert r.exit_code == 0, r.output
    dynamic = json.loads(r.output)["dynamic"]
    assert dynamic["label"] == "mean over 20 real test images" and len(dynamic["ops_per_example"]) == 20
    assert dynamic["worst_case_score"] > json.loads(r.output)["score"]
    assert plot.stat().st_size > 0
