"""The deploy form of Linears applied channels-last (ConvNeXt blocks, transformer MLPs) and of the torch modules that
read their Linears' weights without calling them (MultiheadAttention, TransformerEncoderLayer)."""

import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.vision_transformer import VisionTransformer

from micronet.compress import QuantConfig, SparsityConfig, deploy_form, prune_, quantize_
from micronet.compress.integer_modules import ChannelAffine, IntLinear
from micronet.compress.quant import attach_weight_quantizer
from micronet.errors import MicronetError


def _convnext() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10).eval()
    for block in (m for m in model.modules() if hasattr(m, "layer_scale")):
        block.layer_scale.data.uniform_(0.5, 1.5)  # the 1e-6 init would hide any error in the block
    return model


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # zero-initialised: the logits would be the bias whatever ran before
    return model


def _compress(model: nn.Module, x: torch.Tensor, **exclude) -> nn.Module:
    prune_(model, SparsityConfig(0.5, kinds=("conv", "linear", "fc")))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=4, quantize_fc_input=True,
                                 kinds=("conv", "linear"), **exclude), calibration_data=x)
    return model


CASES = {
    "convnext": (_convnext, (3, 32, 32), {}),
    "vit": (_vit, (3, 16, 16), {"exclude": ("*.out_proj",)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_channels_last_linears_deploy_exactly_in_float64(case):
    build, shape, kw = CASES[case]
    x = torch.randn(8, *shape)
    model = _compress(build(), x, **kw).double()
    n_linear = sum(isinstance(m, nn.Linear) and not name.endswith("out_proj") for name, m in model.named_modules())
    deployed = deploy_form(model)
    # every Linear (block, MLP and head) became integer codes with its output scales on the feature axis
    assert sum(isinstance(m, IntLinear) for m in deployed.modules()) == n_linear
    assert any(isinstance(m, ChannelAffine) and m.axis == -1 and m.per_channel for m in deployed.modules())
    with torch.no_grad():
        ref, got = model(x.double()), deployed(x.double())
    assert float((got - ref).abs().max()) < 1e-9 * float(ref.abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_channels_last_linears_match_in_float32_up_to_rounding_ties(case):
    build, shape, kw = CASES[case]
    x = torch.randn(16, *shape)
    model = _compress(build(), x, **kw)
    with torch.no_grad():
        ref = model(x)
        diff = (deploy_form(model)(x) - ref).abs().amax(1)
    assert float((diff < 1e-5 * float(ref.abs().max())).float().mean()) >= 0.9


def test_channel_affine_on_the_last_axis():
    scale, bias = torch.tensor([2.0, 3.0, -1.0]), torch.tensor([0.5, 0.0, 1.0])
    x = torch.randn(2, 4, 5, 3)
    y = ChannelAffine(scale, bias, axis=-1)(x)
    for c in range(3):
        assert torch.equal(y[..., c], x[..., c] * scale[c] + bias[c])


def test_batchnorm_after_a_linear_on_a_3d_input_is_not_folded_into_its_features():
    # BatchNorm1d normalises dim 1 (here the sequence positions); the Linear's outputs are the last dim.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(deploy_form(model)(x), model(x), atol=1e-6)


def _linear_bn(batch_shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model, torch.randn(*batch_shape, 4)


def test_batchnorm_after_a_linear_on_a_3d_example_stays_a_separate_affine():
    # Told the input is [N, C, L], the merge still keeps the BN (dim 1 = C) apart from the features (dim 2).
    model, x = _linear_bn((3, 4))
    deployed = deploy_form(model.double(), example=torch.empty(3, 4, 4, dtype=torch.float64, device="meta"))
    assert [type(m) for m in deployed.children()] == [nn.Linear, ChannelAffine]
    assert torch.equal(deployed.get_submodule("0").weight, model[0].weight)  # nothing folded into the Linear
    x = x.double()
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=0, atol=1e-12)


def test_batchnorm_after_a_linear_on_a_2d_example_folds_into_it():
    # On [N, F] dim 1 is the Linear's feature axis: the BN folds (w' = s·w, b' = s·b + t), exactly in float64.
    model, x = _linear_bn((5,))
    model = model.double()
    bn = model[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy_form(model, example=torch.empty(1, 4, dtype=torch.float64, device="meta"))
    assert [type(m) for m in deployed.children()] == [nn.Linear]
    with torch.no_grad():
        assert torch.allclose(deployed.get_submodule("0").weight, s[:, None] * model[0].weight, rtol=0, atol=1e-12)
        assert torch.allclose(deployed(x.double()), model(x.double()), rtol=0, atol=1e-12)
    # without an example the rank is unknown: kept apart, as before
    assert [type(m) for m in deploy_form(model).children()] == [nn.Linear, ChannelAffine]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is unchanged


class _CountingMLP(nn.Module):
    """Writes its own buffer as it runs: the rank pass must run on a copy, never on the caller's tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.bn(self.linear(x))


def test_the_rank_pass_neither_runs_nor_writes_the_callers_model():
    model = _CountingMLP().eval()
    weight = model.linear.weight.clone()
    deployed = deploy_form(model, share=True, example=torch.empty(1, 4, device="meta"))
    assert not any(isinstance(m, ChannelAffine) for m in deployed.modules())  # the ranks were known: BN folded
    assert float(model.calls) == 0 and torch.equal(model.linear.weight, weight)


def test_quantized_linear_out_scale_combines_with_a_batchnorm_on_2d_features():
    # out_scale (axis -1, s_a·s_w per feature) then the BN (axis 1): one affine on [N, F], two on [N, C, L].
    model, x = _linear_bn((5,))
    attach_weight_quantizer(model[0], 4)
    with torch.no_grad():
        ref = model(x)
    flat = deploy_form(model, example=torch.empty(1, 4, device="meta"))
    affines = [m for m in flat.modules() if isinstance(m, ChannelAffine)]
    assert len(affines) == 1 and any(isinstance(m, IntLinear) for m in flat.modules())
    assert affines[0].origin and affines[0].origin[0].kind == "bn"
    with torch.no_grad():
        assert torch.allclose(flat(x), ref, atol=1e-5)
    seq = deploy_form(model, example=torch.empty(3, 4, 4, device="meta"))
    assert sum(isinstance(m, ChannelAffine) for m in seq.modules()) == 2
    assert sum(isinstance(m, ChannelAffine) for m in deploy_form(model).modules()) == 2


def _attention_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(2), nn.Linear(64, 16),
                         nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Flatten(),
                         nn.Linear(48, 10)).eval()


def test_quantizing_a_linear_whose_weight_is_read_directly_is_refused_before_any_work():
    model = _attention_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MicronetError, match=r"^2\.self_attn\.out_proj: cannot quantize a Linear inside "
                                            r"nn\.MultiheadAttention, which reads its weight directly"):
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4, kinds=("linear",)))
    # the encoder layer's fast path hands its feed-forward weights to one fused kernel
    with pytest.raises(MicronetError, match=r"^2\.linear1: cannot quantize a Linear inside "
                                            r"nn\.TransformerEncoderLayer"):
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4, kinds=("linear",), exclude=("*.out_proj",)))
    assert model.state_dict().keys() == before.keys()  # no quantizer was attached to any layer
    assert not any(hasattr(m, "parametrizations") or hasattr(m, "input_quantizer") for m in model.modules())


def test_deploy_form_names_a_directly_read_quantized_linear():
    # Quantized by hand (as a script might): the deploy form refuses it by path, not as a failed forward pass.
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    attach_weight_quantizer(model[1].out_proj, 4)
    with pytest.raises(MicronetError, match=r"^1\.out_proj: cannot quantize a Linear inside nn\.MultiheadAttention"):
        deploy_form(model)


def test_pruned_attention_linears_deploy_exactly():
    # A mask keeps a float weight that the attention reads directly: pruning these Linears is supported.
    model = _attention_model()
    prune_(model, SparsityConfig(0.5, kinds=("linear", "fc")))
    x = torch.randn(2, 3, 8, 8)
    deployed = deploy_form(model)
    assert float((deployed.get_submodule("2.linear2").weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-6)
