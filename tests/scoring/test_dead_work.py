"""Only the work inference needs is charged: a branch computed and thrown away is listed under `dead`."""

import torch
from torch import nn

from micronet.scoring import score
from tests.scoring.nets import no_exact_zeros_


class SEBlock(nn.Module):
    """conv -> (squeeze-and-excitation branch, optionally discarded) -> relu."""

    def __init__(self, discard: bool, with_branch: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.discard, self.with_branch = discard, with_branch

    def forward(self, x):
        y = self.conv(x)
        if self.with_branch:
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            if not self.discard:
                y = y * s
        return torch.relu(y)


def test_a_discarded_branch_scores_as_the_model_without_it_and_is_listed():
    torch.manual_seed(0)
    dead = no_exact_zeros_(SEBlock(discard=True)).eval()
    plain = SEBlock(discard=True, with_branch=False).eval()
    plain.load_state_dict(dead.state_dict())
    a, b = score(dead, input_shape=(1, 8, 6, 6)), score(plain, input_shape=(1, 8, 6, 6))
    assert a.params == b.params and a.ops == b.ops
    modules = {d["module"] for d in a.dead}
    assert {"fc1", "fc2"} <= modules
    fc_params = sum(d["params"] for d in a.dead)
    assert fc_params == 8 * 2 + 2 + 2 * 8 + 8  # both 1x1 convs' weights and biases
    used = score(no_exact_zeros_(SEBlock(discard=False)).eval(), input_shape=(1, 8, 6, 6))
    assert used.ops > a.ops and not used.dead


def test_in_place_work_on_a_live_tensor_stays_live():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y[:, :2].mul_(3)  # writes through a view into y, which is returned
            return y

    report = score(InPlace().eval(), input_shape=(1, 4))
    assert not report.dead and report.mults_raw == 4 + 2
