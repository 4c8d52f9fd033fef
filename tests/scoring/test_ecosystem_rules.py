"""Cost rules for the layers researchers bring (norms, attention, transposed conv, ...), each against a hand
count, and dense MACs of full-size torchvision models against torch's FlopCounterMode."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from micronet.errors import MicronetError
from micronet.scoring import score
from tests.scoring.nets import no_exact_zeros_


class Wrap(nn.Module):
    """A module around a function, so a functional op can be scored."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(x, *self.mods)


def _kind(report, kind):
    rows = [r for r in report.layers if r.kind == kind]
    return sum(r.mults_raw for r in rows), sum(r.adds_raw for r in rows), sum(r.params for r in rows)


def test_layer_norm_hand_count():
    # x [1, 3, 4, 5] normalised over the last dim: 12 groups of n = 5 (60 elements).
    # mults: 2 per element + 3 per group + 60 (weight); adds: 60 centring + 2*(5-1)*12 sums + 12 eps + 60 (bias)
    model = Wrap(lambda x, ln: ln(x), no_exact_zeros_(nn.LayerNorm(5))).eval()
    r = score(model, input_shape=(1, 3, 4, 5))
    assert _kind(r, "layernorm") == (2 * 60 + 3 * 12 + 60, 60 + 2 * 4 * 12 + 12 + 60, 10)
    assert r.complete


def test_group_norm_without_affine_charges_no_parameters():
    # 2 groups of 2 channels x 3 x 3 = 18 elements, 36 in all; no weight, no bias.
    model = Wrap(lambda x, gn: gn(x), nn.GroupNorm(2, 4, affine=False)).eval()
    r = score(model, input_shape=(1, 4, 3, 3))
    assert _kind(r, "groupnorm") == (2 * 36 + 3 * 2, 36 + 2 * 17 * 2 + 2, 0)


def test_instance_norm_is_a_normalisation_per_channel():
    model = Wrap(lambda x, n: n(x), nn.InstanceNorm2d(4)).eval()
    r = score(model, input_shape=(1, 4, 3, 3))
    assert _kind(r, "instancenorm") == (2 * 36 + 3 * 4, 36 + 2 * 8 * 4 + 4, 0)


def test_sdpa_hand_count_and_causal_mask():
    # q, k, v [1, 2, 5, 8] (the input viewed three times): 2 heads x 5 x 5 = 50 scores.
    def attend(x, causal=False):
        return F.scaled_dot_product_attention(x, x * 1.0, x * 1.0, is_causal=causal)

    r = score(Wrap(lambda x: attend(x)).eval(), input_shape=(1, 2, 5, 8))
    mm = _kind(r, "matmul")
    assert mm[0] == 50 * 8 + 50 * 8 and mm[1] == 50 * 7 + 2 * 5 * 4 * 8
    assert _kind(r, "softmax")[:2] == (100, 50)
    causal = score(Wrap(lambda x: attend(x, True)).eval(), input_shape=(1, 2, 5, 8))
    assert _kind(causal, "matmul")[0] == 2 * 15 * 8 * 2  # rows attend to 1..5 keys: 15 scores per head


def test_multihead_attention_fast_path_hand_count():
    torch.manual_seed(0)
    mha = no_exact_zeros_(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    r = score(Wrap(lambda x, m: m(x, x, x, need_weights=False)[0], mha).eval(), input_shape=(1, 5, 8))
    # in-projection 5 tokens x 24 x 8, out-projection 5 x 8 x 8; attention 2 heads x 25 scores x d=4, twice.
    assert _kind(r, "linear")[0] == 5 * 24 * 8 + 5 * 8 * 8
    assert _kind(r, "matmul")[0] == 2 * 25 * 4 * 2
    assert _kind(r, "linear")[2] == 24 * 8 + 24 + 8 * 8 + 8
    assert r.complete


def test_transformer_encoder_layer_fast_path():
    torch.manual_seed(0)
    layer = no_exact_zeros_(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)).eval()
    r = score(Wrap(lambda x, m: m(x), layer).eval(), input_shape=(1, 5, 8))
    assert r.complete
    # attention projections + FFN 8 -> 16 -> 8 on 5 tokens
    assert _kind(r, "linear")[0] == 5 * (24 * 8 + 8 * 8 + 16 * 8 + 8 * 16)
    assert _kind(r, "layernorm")[2] == 4 * 8


def test_conv_transpose_hand_count():
    torch.manual_seed(0)
    conv = no_exact_zeros_(nn.ConvTranspose2d(2, 3, 3, stride=2))
    r = score(Wrap(lambda x, c: c(x), conv).eval(), input_shape=(1, 2, 4, 4))
    out = 3 * 9 * 9
    mults = 16 * 2 * 3 * 9  # every input element times every tap of its channel
    assert _kind(r, "conv")[:2] == (mults, mults - out + out)


def test_conv_transpose_multiplies_the_zeros_of_a_weight_stored_dense():
    torch.manual_seed(0)
    conv = no_exact_zeros_(nn.ConvTranspose2d(4, 8, 3, bias=False))
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 0  # one stray zero: cheaper stored dense, so it is stored and multiplied
    model = Wrap(lambda x, c: c(x), conv).eval()
    assert _kind(score(model, input_shape=(1, 4, 5, 5)), "conv")[0] == 25 * 4 * 8 * 9
    with torch.no_grad():
        conv.weight[1] = 0  # input channel 1 removed: a bit per input channel, kept rows stored whole
    assert _kind(score(model, input_shape=(1, 4, 5, 5)), "conv")[0] == 25 * 3 * 8 * 9


def test_prelu_upsample_adaptive_max_embedding_pow_and_mish():
    prelu = Wrap(lambda x, p: p(x), nn.PReLU(4)).eval()
    r = score(prelu, input_shape=(1, 4, 3, 3))
    assert _kind(r, "prelu") == (72, 0, 4)
    up = score(Wrap(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")).eval(), input_shape=(1, 1, 2, 2))
    assert _kind(up, "upsample")[:2] == (4 * 16, 3 * 16)
    amp = score(Wrap(lambda x: F.adaptive_max_pool2d(x, 2)).eval(), input_shape=(1, 1, 5, 5))
    assert _kind(amp, "maxpool")[0] == 36 - 4  # windows 3x3 each: 4 x (9 - 1) comparisons
    emb = nn.Embedding(10, 3)
    r = score(Wrap(lambda x, e: e(x.abs().long().clamp(max=9)), emb).eval(), input_shape=(1, 4))
    assert _kind(r, "embedding") == (0, 0, 30)
    sq = score(Wrap(lambda x: x.pow(2) + x.pow(3) + x.pow(0.7)).eval(), input_shape=(1, 6))
    assert _kind(sq, "pow")[0] == 6 * (1 + 2 + 3)
    mish = score(Wrap(lambda x: F.mish(x)).eval(), input_shape=(1, 6))
    assert _kind(mish, "mish")[:2] == (36, 18)


def test_einsum_with_a_batched_static_weight():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, 5) + 10)  # h, d, e: nonzero everywhere

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = weight

        def forward(self, x):
            return torch.einsum("bhnd,hde->bhne", x, self.w)

    r = score(Heads().eval(), input_shape=(1, 4, 6, 3))
    assert _kind(r, "linear")[0] == 4 * 6 * 3 * 5 and _kind(r, "linear")[2] == 60


def test_strict_fails_on_an_unsupported_op_and_json_says_incomplete():
    model = Wrap(lambda x: torch.special.i0(x)).eval()
    report = score(model, input_shape=(1, 4))
    assert not report.complete and report.to_dict()["complete"] is False
    assert report.unknown_ops[0]["op"] == "aten::special_i0" or report.unknown_ops[0]["op"].endswith("i0")
    assert "LOWER BOUND" in report.table()
    with pytest.raises(MicronetError, match="strict"):
        score(model, input_shape=(1, 4), strict=True)


def test_as_strided_is_free_not_unknown():
    r = score(Wrap(lambda x: x.clone().as_strided_((2, 2), (1, 2)) * 2).eval(), input_shape=(1, 4))
    assert r.complete


def test_imagenet_track_defaults_to_224_and_records_the_size():
    model = Wrap(lambda x: x.mean()).eval()
    report = score(model, track="imagenet")
    assert report.input_shape == (1, 3, 224, 224) and report.to_dict()["input_size"] == [224, 224]
    assert score(model, input_size=(16, 24)).input_shape == (1, 3, 16, 24)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_dense_macs_match_flop_counter_mode(name):
    torch.manual_seed(0)
    model = no_exact_zeros_(getattr(torchvision.models, name)(weights=None)).eval()
    # Grad enabled: nn.MultiheadAttention takes its slow path there, whose projections FlopCounterMode counts.
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    oracle = sum(counts.get(op, 0) for op in ("aten.convolution", "aten.addmm", "aten.mm", "aten.linear")) // 2
    report = score(model, track="imagenet")
    kinds = report.by_kind()
    assert kinds["conv"]["mults_raw"] + kinds["linear"]["mults_raw"] == oracle
    assert report.complete and not report.dead
    if name == "vit_b_16":  # attention: 12 layers x 12 heads x 197^2 scores x d=64, for QK^T and for AV
        assert kinds["matmul"]["mults_raw"] == 12 * 12 * 197 * 197 * 64 * 2


def test_nearest_upsampling_is_free_data_movement():
    for mode in ("nearest", "nearest-exact"):
        up = score(Wrap(lambda x, m=mode: F.interpolate(x, scale_factor=2, mode=m)).eval(), input_shape=(1, 1, 2, 2))
        assert up.ops == 0 and up.complete and not up.unknown_ops
