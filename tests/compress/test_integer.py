import pytest
import torch
import torch.nn.functional as F
from torch import nn

from micronet import models
from micronet.compress import (
    QuantConfig,
    SparsityConfig,
    deploy_form,
    integer_modules,
    prune_,
    quantize_,
    recalibrate_bn_,
)
from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp, ScaledWeight

from .conftest import TINY, randomize_bn_


def _compressed(spec: str) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn_(models.create(spec).eval())
    prune_(model, SparsityConfig(0.5))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=4),
              calibration_data=torch.randn(16, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("family", sorted(TINY))
def test_bn_folding_reproduces_logits(family):
    torch.manual_seed(0)
    model = randomize_bn_(models.create(TINY[family]).eval())
    x = torch.randn(8, 3, 32, 32)
    folded = deploy_form(model)
    assert (folded(x) - model(x)).abs().max() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize("family", sorted(TINY))
def test_integer_form_reproduces_fake_quant_logits_exactly_in_float64(family):
    # In float64 re-associated scales cannot flip a rounding decision, so this checks the algebra itself.
    model = _compressed(TINY[family]).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    deployed = deploy_form(model)
    assert (deployed(x) - ref).abs().max() < 1e-9
    assert torch.equal(model(x), ref)  # the caller's model is untouched


@pytest.mark.parametrize("family", sorted(TINY))
def test_integer_form_matches_in_float32_up_to_rounding_ties(family):
    # In fp32 a value within an ulp of a .5 tie may round the other way (spec onnx-export.md §5):
    # almost every sample is identical to fp32 rounding, none drifts beyond one code flip's effect.
    model = _compressed(TINY[family])
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        diff = (deploy_form(model)(x) - model(x)).abs().amax(1)
    assert float((diff < 1e-5).float().mean()) >= 0.9
    assert float(diff.max()) < 0.1


def test_integer_form_of_densenet_is_the_winners_merged_network():
    model = _compressed(TINY["densenet"])
    deployed = deploy_form(model)
    kinds = [type(m) for m in deployed.modules()]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert kinds.count(IntConv2d) == n_conv and kinds.count(IntLinear) == 1
    assert nn.BatchNorm2d not in kinds
    # every activation quantizer became a RoundClamp onto 0..15 (the ReLU absorbed by the clamp at 0)
    clamps = [m for m in deployed.modules() if isinstance(m, RoundClamp)]
    assert len(clamps) == n_conv - 1 and all((c.qmin, c.qmax) == (0, 15) for c in clamps)
    # weights are integer codes within the signed 4-bit range, zeros preserved
    for m in deployed.modules():
        if isinstance(m, IntConv2d):
            assert torch.equal(m.weight, m.weight.round()) and m.weight.min() >= -8 and m.weight.max() <= 7
    # per bottleneck: BN1+ReLU+step -> one affine; conv1 dequant + BN2 + step -> one affine; conv2 dequant
    affines = [m for m in deployed.modules() if isinstance(m, ChannelAffine)]
    n_layers = sum(1 for n, _ in model.named_modules() if n.endswith(".conv1"))
    n_trans = sum(1 for n, _ in model.named_modules() if n.startswith("trans") and n.endswith(".conv"))
    # stem scale + 3 per bottleneck + 2 per transition + final BN + FC dequant
    assert len(affines) == 1 + 3 * n_layers + 2 * n_trans + 1 + 1


def test_bn_recalibration_changes_bn_stats_and_nothing_else(tiny_densenet):
    model = _compressed(TINY["densenet"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(8, 3, 32, 32) * 2 + 1 for _ in range(3)]
    assert recalibrate_bn_(model, data, batches=2) == 2
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert not model.training
    # cumulative average over exactly the batches used: the stem BN's input does not depend on any BN, so
    # capture it and compute the expected statistics by hand (mean of per-batch means and unbiased variances)
    stem_bn = model.block1[0].bn1
    seen = []
    handle = stem_bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        for x in data[:2]:
            model(x)
    handle.remove()
    means = torch.stack([t.mean(dim=(0, 2, 3)) for t in seen])
    variances = torch.stack([t.transpose(0, 1).reshape(t.shape[1], -1).var(dim=1, unbiased=True) for t in seen])
    assert torch.allclose(stem_bn.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(stem_bn.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-6)
    assert int(stem_bn.num_batches_tracked) == 2


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("compressed", [False, True], ids=["float", "compressed"])
def test_deploy_form_leaves_every_parameter_and_buffer_of_the_caller_bit_for_bit(compressed):
    torch.manual_seed(0)
    model = _compressed(TINY["pyramidnet"]) if compressed else randomize_bn_(models.create(TINY["pyramidnet"]).eval())
    before = {k: v.detach().clone() for k, v in _tensors(model).items()}
    deployed = deploy_form(model)
    with torch.no_grad():
        deployed(torch.randn(2, 3, 32, 32))
        deploy_form(deployed)(torch.randn(2, 3, 32, 32))
    after = _tensors(model)
    assert before.keys() == after.keys()
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in after.items())


def test_deploy_form_shares_the_tensors_it_does_not_convert_when_asked():
    # Memory (the scorer's choice): weights are the bulk of a model; a tensor the conversion only reads stays put.
    torch.manual_seed(0)
    model = randomize_bn_(models.create(TINY["pyramidnet"]).eval())
    deployed = deploy_form(model, share=True)
    # the classifier reads a BN's output, so nothing folds into it: it runs on the caller's own weight
    assert deployed.fc.weight.data_ptr() == model.fc.weight.data_ptr()
    assert deployed.fc.weight is not model.fc.weight  # a new Parameter object: rebinding it leaves the caller's
    # an integer deploy form converts nothing: its copy holds every weight code where the original holds it
    integer = deploy_form(_compressed(TINY["densenet"]))
    again = deploy_form(integer, share=True)
    codes = {m.weight.data_ptr() for m in integer.modules() if isinstance(m, IntConv2d | IntLinear)}
    assert codes and codes == {m.weight.data_ptr() for m in again.modules() if isinstance(m, IntConv2d | IntLinear)}
    # by default (share=False) the deploy form owns every tensor
    owned = deploy_form(model)
    caller = {t.untyped_storage().data_ptr() for t in _tensors(model).values()}
    assert not any(t.untyped_storage().data_ptr() in caller for t in _tensors(owned).values())


def test_the_scoring_deploy_form_folds_into_weights_that_hold_no_memory_and_compute_the_eager_values():
    # deploy_form(share=True) (the scorer's) folds BN into ScaledWeights over the caller's weights: the eager fold's
    # values bit for bit, computed per use, so scoring never holds a second copy of every folded weight.
    torch.manual_seed(0)
    model = randomize_bn_(models.create(TINY["pyramidnet"]).eval())
    model.layer1[0].bn2.weight.data[1] = 0.0  # a zero scale: its folded filter is all zeros
    lazy, eager = deploy_form(model, share=True), deploy_form(model)
    eager_weights = dict(eager.named_parameters())
    caller = {t.untyped_storage().data_ptr() for t in model.parameters()}
    folded = {name: p for name, p in lazy.named_parameters() if isinstance(p, ScaledWeight)}
    assert len(folded) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # every conv absorbed a BN
    for name, p in folded.items():
        assert p.base.untyped_storage().data_ptr() in caller  # the caller's weight, not a copy
        assert torch.equal(p.materialize(), eager_weights[name])
    assert not bool(folded["layer1.0.conv1.weight"].materialize()[1].any())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lazy(x), eager(x))
        with pytest.raises(RuntimeError, match="read-only"):
            folded["layer1.0.conv1.weight"].mul_(2)
    # converted again, the scoring form gives an owning form with real folded Parameters (what export writes)
    owned = dict(deploy_form(lazy).named_parameters())
    assert all(type(owned[name]) is nn.Parameter and torch.equal(owned[name], eager_weights[name]) for name in folded)


@pytest.mark.parametrize("chunk", [7, 1 << 20], ids=["ragged", "default"])
def test_a_folded_weights_nonzeros_are_the_eager_folds_found_a_few_channels_at_a_time(chunk, monkeypatch):
    # The scorer's cost rules read only which values of a weight are nonzero; a ScaledWeight finds them a few output
    # channels at a time (its values are never all in memory). They must be the eager fold's, underflow included:
    # 1e-30 scaled by about 1e-20 is below float32's smallest subnormal, so a nonzero base value folds to zero.
    monkeypatch.setattr(integer_modules, "_MASK_CHUNK", chunk)
    torch.manual_seed(0)
    model = randomize_bn_(models.create(TINY["pyramidnet"]).eval())
    with torch.no_grad():
        model.layer1[0].conv1.weight[2, 0, 0, 0] = 1e-30
        model.layer1[0].bn2.weight[2] = 1e-20
        model.layer1[0].bn2.weight[1] = 0.0  # a zero scale: a whole filter folds to zeros
    lazy, eager = deploy_form(model, share=True), dict(deploy_form(model).named_parameters())
    folded = {name: p for name, p in lazy.named_parameters() if isinstance(p, ScaledWeight)}
    underflow = eager["layer1.0.conv1.weight"]
    assert underflow[2, 0, 0, 0] == 0 and bool(underflow[2].ne(0).sum() > 1) and not bool(underflow[1].any())
    for name, p in folded.items():
        assert torch.equal(p.nonzero_mask(), eager[name].ne(0)), name


def test_a_scaled_weights_nonzeros_with_any_broadcastable_scale(monkeypatch):
    # Folding makes [out, 1, ...] scales; a scale along another dimension (a [4] vector over a [4, 4] weight scales
    # its columns) or a 0-dim weight must give materialize()'s mask too, whatever the chunk.
    monkeypatch.setattr(integer_modules, "_MASK_CHUNK", 1)
    base = torch.tensor([[1.0, 2.0, 0.0, 0.25]] * 4)
    columns = torch.tensor([1.0, 0.0, 2.0, 1e-45])  # 0.25 x the smallest subnormal underflows to 0
    for w in (ScaledWeight(base, (columns,)), ScaledWeight(base, (torch.tensor([[0.0], [1.0], [2.0], [3.0]]), columns)),
              ScaledWeight(torch.tensor(2.0), (torch.tensor(0.0),))):
        assert torch.equal(w.nonzero_mask(), w.materialize().ne(0))


class _ReadsItsConvWeight(nn.Module):
    """A forward that calls a conv (BN after it) and also reads that conv's weight directly."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.fc(F.conv2d(y, self.conv.weight[:, :3], padding=1).mean((2, 3)))


def test_a_folded_layer_whose_weight_is_also_read_directly_keeps_the_original_for_those_reads():
    torch.manual_seed(0)
    model = randomize_bn_(_ReadsItsConvWeight()).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for share in (False, True):
        torch.testing.assert_close(deploy_form(model, share=share)(x), model(x), rtol=1e-12, atol=1e-12)
