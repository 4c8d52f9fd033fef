"""Dead-work analysis starts from the model's outputs: every way a model returns tensors is followed, and a
model whose outputs cannot be followed is refused instead of scoring 0."""

import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch import nn

from micronet.errors import MicronetError
from micronet.scoring import score
from tests.scoring.nets import no_exact_zeros_

# Hand count: Linear(3*4*4 -> 10) = 480 weights + 10 biases; 480 MACs.
SHAPE = (1, 3, 4, 4)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: int = 0


class Pair(NamedTuple):
    logits: torch.Tensor
    name: str


class Holder:
    def __init__(self, logits):
        self.logits = logits


class Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.fc = nn.Linear(48, 10)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.fc(x.flatten(1)))


def _plain():
    torch.manual_seed(0)
    return no_exact_zeros_(Net(lambda y: y)).eval()


@pytest.mark.parametrize(
    "wrap",
    [lambda y: Out(y), lambda y: Pair(y, "a"), lambda y: Holder(y), lambda y: {"out": [Out(y)]}],
    ids=["dataclass", "namedtuple", "object", "nested"],
)
def test_wrapped_outputs_score_like_a_plain_tensor_output(wrap):
    plain = _plain()
    wrapped = Net(wrap).eval()
    wrapped.load_state_dict(plain.state_dict())
    a, b = score(wrapped, input_shape=SHAPE), score(plain, input_shape=SHAPE)
    assert a.params == b.params == 490
    assert a.ops == b.ops and a.ops > 0
    assert not a.dead and a.complete


@pytest.mark.parametrize("wrap", [lambda y: y.tolist(), lambda y: y.numpy()], ids=["tolist", "numpy"])
def test_an_output_without_tensors_is_refused_not_scored_zero(wrap):
    # Scoring another model first must not change the outcome (no state carried between scores).
    score(_plain(), input_shape=SHAPE)
    with pytest.raises(MicronetError, match="holds no tensor") as err:
        score(Net(wrap).eval(), input_shape=SHAPE)
    assert "\n" not in str(err.value)


class Stateful(nn.Module):
    """A forward that keeps its last activation on ``self`` (a plain tensor attribute)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 10)
        self.state = torch.zeros(1, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1)) + self.state
        self.state = torch.tanh(out)
        return out


def test_a_forward_assigning_a_tensor_attribute_is_refused_with_the_attribute_named():
    with pytest.raises(MicronetError, match="'state'") as err:
        score(Stateful().eval(), input_shape=SHAPE)
    assert "\n" not in str(err.value)


class Keeps(nn.Module):
    """Assigns a tensor attribute it never reads back: that tanh is dead, the rest is charged."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        self.last = torch.tanh(out)
        return out


def test_an_attribute_assigned_but_not_read_back_leaves_the_rest_charged():
    plain = _plain()
    keeps = Keeps().eval()
    keeps.load_state_dict({k: v for k, v in plain.state_dict().items()})
    a, b = score(keeps, input_shape=SHAPE), score(plain, input_shape=SHAPE)
    assert a.params == b.params == 490 and a.ops == b.ops
