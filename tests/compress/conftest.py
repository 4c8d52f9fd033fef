import pytest
import torch

from micronet import models


def randomize_bn_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so folding errors would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


TINY = {
    "densenet": "densenet_bc:depth=10,growth=4",
    "pyramidnet": "pyramidnet:depth=11,alpha=8",
    "pyramidskipnet": "pyramidskipnet:depth=20,alpha=8",
    "wrn": "wrn:depth=10,width=1",
}


@pytest.fixture
def tiny_densenet():
    torch.manual_seed(0)
    return randomize_bn_(models.create(TINY["densenet"]).eval())
