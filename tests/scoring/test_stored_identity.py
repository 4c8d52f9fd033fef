"""Which stored tensors a model has: each charged once, whether it is a parameter, a buffer, a plain attribute or
derived in the forward, however often and in whichever traced example it is computed (review findings).

The oracle is the same model with those tensors precomputed into buffers, or a hand count. The models branch on
their input's shape, which fx cannot trace: they are scored as they run, not as an fx deploy form (which would
fold derived weights into buffers and drop attribute assignments before the scorer sees them)."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from micronet.scoring import score
from micronet.scoring.accounting import account
from micronet.scoring.policy import resolve_policy
from micronet.scoring.trace import TensorMap, trace_model


def _untraceable(x: torch.Tensor) -> None:
    if x.shape[0] < 1:  # never true, free, and no fx trace gets past it
        raise ValueError("empty batch")


def _weights(*shape: int, n: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


class _Derived(nn.Module):
    """Weights the forward derives from one parameter (``derive``), or the same values held as buffers."""

    def __init__(self, derive, count: int, as_buffers: bool = False):
        super().__init__()
        self.w = nn.Parameter(_weights(4, 8, 8)[0])
        self.derive, self.as_buffers = derive, as_buffers
        if as_buffers:
            for i, d in enumerate(derive(self.w.detach())):
                self.register_buffer(f"d{i}", d.clone())
        self.count = count

    def forward(self, x):
        _untraceable(x)
        ws = [getattr(self, f"d{i}") for i in range(self.count)] if self.as_buffers else self.derive(self.w)
        return torch.cat([x @ w for w in ws], -1)


def _heads(w):  # one slice of the parameter per head, each scaled: four different weights of one shape
    return [w[i] * 1.5 for i in range(4)]


def _triangles(w):  # two factory masks of one shape
    return [w[0] * torch.triu(torch.ones(8, 8)), w[0] * torch.tril(torch.ones(8, 8))]


def _transposed(w):
    return [w[0] * w[1], w[0].t() * w[1]]


def _recomputed(w):  # the same weight derived at every step of a loop (a pruned layer applied T times)
    return [w[0] * 2.0 for _ in range(3)]


def _clone_masked(w):  # copies of one weight, each masked in place
    a, b = w[0].clone(), w[0].clone()
    a.mul_(torch.triu(torch.ones(8, 8)))
    b.mul_(torch.tril(torch.ones(8, 8)))
    return [a, b]


def _filled(w):  # factory tensors filled with weights
    a, b = torch.zeros(8, 8), torch.zeros(8, 8)
    a.copy_(w[0])
    b.copy_(w[1])
    return [a, b]


def _block(w):  # a weight written into a slice of a factory tensor
    a = torch.zeros(8, 8)
    a[:, :4] = w[0][:, :4]
    return [a]


def _bjorck(w):  # 12 steps of Björck orthonormalisation: every intermediate is derived from the ones before
    v = w[0] / 8
    for _ in range(12):
        v = 1.5 * v - 0.5 * v @ v.t() @ v
    return [v]


@pytest.mark.parametrize(("derive", "count", "params"), [
    (_heads, 4, 4 * 64), (_triangles, 2, 2 * 38), (_transposed, 2, 2 * 64), (_recomputed, 3, 64), (_bjorck, 1, 64),
    (_clone_masked, 2, 2 * 38), (_filled, 2, 2 * 64), (_block, 1, Fraction(4 * 8 * 32 + 8, 32)),
], ids=["heads", "factory-masks", "transposed-view", "recomputed-in-a-loop", "bjorck", "clones-masked-in-place",
        "factory-filled", "written-into-a-slice"])
def test_weights_derived_in_the_forward_are_charged_as_the_same_weights_held_as_buffers(derive, count, params):
    # Hand count: every distinct derived 8x8 weight stored dense at 32 bits, 64 params (triu/tril keep 36 of 64:
    # an element mask is cheaper, 36 x 32 + 64 bits = 38 params; half the columns written: a bit per input column,
    # 4 x 8 values + 8 bits); a weight recomputed at every step, once. Review findings: the in-place masked
    # clones shared one key (32.25), the weight written into a slice was never charged (0).
    derived = score(_Derived(derive, count), input_shape=(1, 8))
    buffers = score(_Derived(derive, count, as_buffers=True), input_shape=(1, 8))
    expected = params if derive is not _recomputed else 3 * 64  # three buffers (the same values, three tensors)
    assert buffers.params == expected
    assert derived.params == params
    assert derived.ops == buffers.ops


class _Kept(nn.Module):
    """Tensors the forward keeps for the next call (``mode``): a cache re-derived from itself, a cache decayed in
    place, a state computed for the next call."""

    def __init__(self, mode: str):
        super().__init__()
        self.w = nn.Parameter(_weights(8, 8)[0])
        self.mode, self.kept = mode, None

    def forward(self, x):
        _untraceable(x)
        if self.mode == "rebind":
            self.kept = self.w * 2.0 if self.kept is None else self.kept * 1.0
            return x @ self.kept
        if self.mode == "decay":
            if self.kept is None:
                self.kept = self.w * 2.0
            else:
                self.kept.mul_(0.5)
            return x @ self.kept
        out = x * 2.0 if self.kept is None else x * 2.0 + self.kept
        self.kept = x @ self.w  # used by the next call only
        return out


@pytest.mark.parametrize(("mode", "samples"), [
    ("decay", 1), ("decay", 3), ("rebind", 1),
    pytest.param("rebind", 3, marks=pytest.mark.xfail(strict=True, reason=(
        "known limitation: a kept tensor re-derived out of place from itself is two derivations, charged twice"))),
])
def test_a_tensor_the_model_keeps_between_examples_is_charged_once(mode, samples):
    # Hand count: the cache, one 8x8 weight dense at 32 bits: 64 params whatever the number of examples (before:
    # 64 more per example); its matmul, 64 mults and 56 adds per example.
    report = score(_Kept(mode), input_shape=(1, 8), samples=samples)
    assert report.params == 64
    layer = next(r for r in report.to_dict()["layers"] if r["kind"] == "linear")
    assert (layer["mults_raw"], layer["adds_raw"]) == (64, 56)


@pytest.mark.xfail(strict=True, reason="known limitation: work done only for the next call is dead in its own trace")
def test_a_state_computed_for_the_next_call_is_charged():
    report = score(_Kept("state"), input_shape=(1, 8), samples=3)
    assert any(r["kind"] == "linear" and r["mults_raw"] == 64 for r in report.to_dict()["layers"])


class _Ema(nn.Module):
    """A running mean kept as a plain attribute: a copy of a buffer at the first call, updated in place after."""

    def __init__(self):
        super().__init__()
        self.register_buffer("init_mean", torch.zeros(1, 8))
        self.mean = None

    def forward(self, x):
        _untraceable(x)
        if self.mean is None:
            self.mean = self.init_mean.clone()
        else:
            self.mean.mul_(0.9).add_(0.1 * x)
        return x - self.mean


def test_a_kept_tensor_updated_in_place_is_carried_as_it_is_after_the_update():
    # Review finding: the state kept its first trace's (static) info, so from the third call on its in-place
    # update was free bookkeeping. Hand count from the third call (the state is input-dependent by then):
    # 0.9 * mean and 0.1 * x, 16 mults; the add_ and x - mean, 16 adds.
    model, carried, policy = _Ema().eval(), {}, resolve_policy("official", {})
    per_call = []
    for _ in range(4):
        trace = trace_model(model, torch.randn(1, 8), input_bits=32, float_bits=32, carried=carried)
        rows = account([trace], policy).rows
        per_call.append((sum(r.mults_raw for r in rows), sum(r.adds_raw for r in rows)))
    assert per_call[2:] == [(16, 16), (16, 16)]


class _Scaled(nn.Module):
    """A per-channel scale derived in the forward from a zero-initialised log-scale (LayerScale-like), or held."""

    def __init__(self, as_buffer: bool):
        super().__init__()
        self.log_s = nn.Parameter(torch.zeros(8))
        self.as_buffer = as_buffer
        if as_buffer:
            self.register_buffer("s", self.log_s.detach().exp())

    def forward(self, x):
        _untraceable(x)
        return x * (self.s if self.as_buffer else self.log_s.exp())


def test_equal_values_derived_by_two_modules_are_two_tensors():
    # exp(0) = 1 in both layers: the same values, two stored tensors (8 + 8 params), as two buffers would be.
    for as_buffer in (False, True):
        model = nn.Sequential(_Scaled(as_buffer), nn.ReLU(), _Scaled(as_buffer))
        assert score(model, input_shape=(1, 8)).params == 16


def test_a_sparse_tensor_derived_in_the_forward_is_scored():
    # Review finding: hashing its values crashed ("unsupported memory format"). Its op has no rule: incomplete.
    class SparseMM(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(_weights(8, 8)[0])

        def forward(self, x):
            _untraceable(x)
            return torch.sparse.mm(self.w.to_sparse(), x.t())

    report = score(SparseMM(), input_shape=(1, 8))
    assert not report.complete


class _InPlaceAfterUse(nn.Module):
    """A derived weight used, then masked in place and used again: two weights (or the same as two buffers)."""

    def __init__(self, as_buffers: bool = False):
        super().__init__()
        self.w = nn.Parameter(_weights(8, 8)[0])
        self.register_buffer("m", (torch.arange(64).reshape(8, 8) % 4 == 0).float())  # 16 of 64 kept
        self.as_buffers = as_buffers
        if as_buffers:
            self.register_buffer("dense", self.w.detach() * 1.0)
            self.register_buffer("masked", self.w.detach() * self.m)

    def forward(self, x):
        _untraceable(x)
        if self.as_buffers:
            return x @ self.dense + x @ self.masked
        w = self.w * 1.0
        y = x @ w
        w.mul_(self.m)
        return y + x @ w


@pytest.mark.xfail(strict=True, reason="known limitation: a record reads a static tensor's values when costed, "
                   "after the forward, so an in-place change after a use is seen by the earlier use too")
def test_a_derived_weight_changed_in_place_after_a_use_is_charged_as_it_was_at_each_use():
    # Hand count: 64 dense values, and the masked copy's 16 nonzeros (2 of 8 input columns: 2 x 8 values + 8 mask
    # bits, cheaper than an element mask): 2048 + 520 bits = 80.25 params; 64 + 16 = 80 mults. Before, both uses
    # read the masked values: 32 mults.
    derived, buffers = score(_InPlaceAfterUse(), input_shape=(1, 8)), score(_InPlaceAfterUse(True), input_shape=(1, 8))
    mults = [r["mults_raw"] for r in derived.to_dict()["layers"] if r["kind"] == "linear"]
    assert (derived.params, sum(mults)) == (buffers.params, 80) == (Fraction(321, 4), 80)


class _Tables(nn.Module):
    """Two 8x8 tables in a list attribute, picked by the input, applied by the child the input picks."""

    def __init__(self):
        super().__init__()
        self.tables = _weights(8, 8, n=2)
        self.a, self.b = nn.Identity(), nn.Identity()

    def forward(self, x):
        i = int(x.sum() > 0)
        return (self.a if i else self.b)(x) @ self.tables[i]


def test_constants_held_in_a_list_are_each_charged_once_whoever_reads_them():
    # Two examples, one per table: both tables charged once each, 128 params (before: the second was taken for the
    # first, 64, or one table read from two modules was charged twice).
    data = [torch.ones(1, 8), -torch.ones(1, 8)]
    assert score(_Tables(), input_shape=(1, 8), data=data, samples=2).params == 128
    assert score(_Tables(), input_shape=(1, 8), data=[data[0], data[0]], samples=2).params == 64


class _ClassCache(nn.Module):
    cache: dict = {}  # shared by every instance and by the scorer's copy

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_weights(8, 8)[0])

    def forward(self, x):
        _untraceable(x)
        kept = _ClassCache.cache.setdefault(tuple(x.shape), self.w.t())
        return x @ kept


def test_scoring_leaves_no_mark_on_tensors_the_model_keeps_outside_itself():
    score(_ClassCache(), input_shape=(1, 8))
    assert _ClassCache.cache and not any(hasattr(t, TensorMap.ATTR) for t in _ClassCache.cache.values())


def test_names_of_derived_tensors_stay_short_however_deep_the_derivation():
    # Review finding: names nested their operands' names, growing about 4x per Björck step (738 M characters and
    # 3.9 GB at 12 steps).
    trace = trace_model(_Derived(_bjorck, 1).eval(), torch.randn(1, 8), input_bits=32, float_bits=32)
    assert len(trace.stored) > 12 and max(len(s.name) for s in trace.stored.values()) < 100


class _Sampled(nn.Module):
    """A weight drawn at every call (Bayes-by-backprop at inference), or scaled by a number read from the input."""

    def __init__(self, mode: str):
        super().__init__()
        self.mu, self.rho = nn.Parameter(_weights(8, 8)[0]), nn.Parameter(torch.zeros(8, 8))
        self.mode = mode

    def forward(self, x):
        _untraceable(x)
        if self.mode == "sampled":
            return x @ (self.mu + nn.functional.softplus(self.rho) * torch.randn(8, 8))
        if self.mode == "input-scaled":
            return x @ (self.mu / (float(x.abs().max()) + 1))
        if self.mode == "own-generator":  # a generator made per call (its repr holds an address)
            noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(int(x.abs().sum() * 1000)))
            return x @ (self.mu + nn.functional.softplus(self.rho) * noise)
        return x @ self.mu * torch.tensor(1 / (float(x.abs().max()) + 1))  # a tensor built from an input number


@pytest.mark.parametrize(("mode", "params"), [("sampled", 64), ("input-scaled", 64), ("own-generator", 64),
                                              ("literal-scale", 65)])
def test_a_weight_whose_values_differ_per_example_is_charged_once(mode, params):
    # Review finding: keyed by its values alone, it was charged once per traced example (16 x 64 for 16 samples).
    # Hand count: one 8x8 weight, dense at 32 bits: 64 params, whatever the number of examples (and the scalar
    # tensor built in the forward, 1 more).
    assert [score(_Sampled(mode), input_shape=(1, 8), samples=n).params for n in (1, 16)] == [params, params]


class _Experts(nn.Module):
    """Two of four 8x8 experts chosen in Python by the input, as a bank slice or through torch.tensor indices."""

    def __init__(self, indices: bool):
        super().__init__()
        self.bank, self.indices = nn.Parameter(_weights(4, 8, 8)[0]), indices

    def forward(self, x):
        _untraceable(x)
        first = int(x.sum() > 0)
        if self.indices:
            chosen = torch.index_select(self.bank, 0, torch.tensor([first, first + 2]))
            return x @ chosen[0] + x @ chosen[1]
        return x @ (self.bank[first] * 1.0) + x @ (self.bank[first + 2] * 1.0)


def test_experts_chosen_by_the_input_are_charged_as_what_each_example_uses():
    # Slices of a fixed bank: the experts two examples choose are different tensors, each charged (review finding:
    # numbering value sets per trace charged one). Examples choosing experts {0, 2} and {1, 3}: 4 x 64 params.
    data = [torch.ones(1, 8), -torch.ones(1, 8)]
    assert score(_Experts(False), input_shape=(1, 8), data=data, samples=2).params == 256
    # Chosen through an index tensor built in the forward: one derived (2, 8, 8) selection whatever the indices, its
    # float32 values at 32 bits (not the int64 indices' 64: 256 before), 128 params. Known to undercount the bank
    # when examples choose different experts this way (the selection is one tensor).
    counts = {score(_Experts(True), input_shape=(1, 8), data=data[:n], samples=n).params for n in (1, 2)}
    assert counts == {128}


class _Literals(nn.Module):
    """A tensor built from Python values only for some inputs, then one built for every input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_weights(8, 8)[0])

    def forward(self, x):
        _untraceable(x)
        if float(x.sum()) > 0:
            x = x * torch.tensor(0.5)
        return x @ (self.w * torch.tensor(1 / (float(x.abs().max()) + 1)))


def test_tensors_built_in_the_forward_are_known_by_where_they_are_built():
    # Hand count: the scaled weight w * scale, derived before use (64), and the 0.5 that one example multiplies
    # by (1): 65. Review finding: numbered by rank in the module, the scale was the 2nd tensor built in one example
    # and the 1st in the other, so the scaled weight was two derivations: 129.
    pos, neg = torch.ones(1, 8), -torch.ones(1, 8)
    assert score(_Literals(), input_shape=(1, 8), data=[pos, neg], samples=2).params == 65


class _Codes(nn.Module):
    """An int8 code table gathered by int64 indices."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randint(-8, 8, (16, 8), dtype=torch.int8, generator=torch.Generator()))
        self.register_buffer("rows", torch.arange(0, 16, 2))

    def forward(self, x):
        _untraceable(x)
        return x @ (self.table.index_select(0, self.rows).float() * 0.1)


def test_gathered_values_keep_their_width_not_their_indices():
    # Hand count: the table's 8 rows used, 64 values at 8 bits = 16 params (at the indices' 64 bits: 128).
    layer = next(r for r in score(_Codes(), input_shape=(1, 8)).to_dict()["layers"] if r["kind"] == "linear")
    assert (layer["weight_bits"], layer["params"]) == (8, 16)
