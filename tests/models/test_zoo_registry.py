"""Zoo names, spec strings, canonical names and errors (micronet.models.create / parse_spec)."""

import pytest
import torch

from micronet.errors import MicronetError
from micronet.models import count_params, create, list_families, list_models, parse_spec
from micronet.models.summary import build_for_sizing

ZOO_PARAMS = {
    "densenet100_k12": 800_032,
    "densenet172_k30": 12_232_300,
    "pyramidnet272_a200": 26_288_692,
    "pyramidskipnet272_a200": 26_642_613,
    "shakeshake26_2x32d": 2_934_772,  # 100 classes; tests/models/test_shakeshake.py has the 10-class counts
    "shakeshake26_2x96d": 26_227_572,
    "shakeshake26_2x112d": 35_680_852,
    "wrn28_10": 36_536_884,
}


def test_list_models_is_the_zoo():
    assert list_models() == list(ZOO_PARAMS)
    assert list_families() == ["densenet_bc", "pyramidnet", "pyramidskipnet", "shakeshake", "wrn"]


@pytest.mark.parametrize("name", list(ZOO_PARAMS))
def test_zoo_parameter_counts_and_one_forward(name):
    # Full-size models on the meta device: counts and shapes need no values (the tiny variants of every
    # family run real forwards in their own tests). Train mode: SkipNet's eval path picks blocks by value.
    # build_for_sizing also skips the weight initialisation, which on meta still runs its Python shape functions.
    model = build_for_sizing(lambda: create(name)).train()
    assert count_params(model) == ZOO_PARAMS[name]
    assert model.micronet_spec["name"] == name
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32, device="meta")).shape == (1, 100)


def test_other_head_sizes_and_reference_variants():
    def size(name: str, **options) -> int:  # shapes only (meta device, no initialisation): counts need no values
        return count_params(build_for_sizing(lambda: create(name, **options)))

    assert size("pyramidnet272_a200", num_classes=10) == 26_210_842
    assert size("wrn28_10", conv_bias=True) == 36_546_980
    assert size("wrn28_10:conv_bias=true", num_classes=10) == 36_489_290
    # bearpaw reports 0.77 M for 10 classes: 800,032 - (342 + 1) * 90 (weights and biases of the FC).
    assert size("densenet100_k12", num_classes=10) == 769_162


def test_parse_spec_types():
    assert parse_spec("densenet_bc:depth=10,growth=4") == ("densenet_bc", {"depth": 10, "growth": 4})
    name, options = parse_spec(" wrn : conv_bias=True , width=2, x=0.25, y=1e-3 ")
    assert name == "wrn"
    assert options == {"conv_bias": True, "width": 2, "x": 0.25, "y": 0.001}
    assert isinstance(options["width"], int) and isinstance(options["conv_bias"], bool)
    assert parse_spec("densenet100_k12") == ("densenet100_k12", {})


@pytest.mark.parametrize("spec", ["densenet_bc:depth", "densenet_bc:depth=10,depth=12", "wrn:width=wide", ":depth=1"])
def test_parse_spec_rejects_bad_syntax(spec):
    with pytest.raises(MicronetError):
        parse_spec(spec)


def test_unknown_name_lists_every_valid_name_on_one_line():
    with pytest.raises(MicronetError) as info:
        create("resnet50")
    message = str(info.value)
    assert "\n" not in message and "resnet50" in message
    for name in list_models() + list_families():
        assert name in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("spec", "overrides", "fragment"), [
    ("densenet_bc:depht=10", {}, "valid options: depth, growth, compression, bottleneck"),
    ("densenet100_k12", {"width": 3}, "no option 'width'"),
    ("densenet_bc:depth=10.5", {}, "expected int"),
    ("wrn:conv_bias=1", {}, "expected bool"),
    ("densenet_bc:depth=11", {}, "depth must be"),
    ("pyramidnet:depth=12", {}, "depth must be"),
])
def test_bad_options_are_user_errors(spec, overrides, fragment):
    with pytest.raises(MicronetError, match=fragment):
        create(spec, **overrides)


def test_bad_num_classes():
    with pytest.raises(MicronetError, match="num_classes"):
        create("densenet_bc:depth=10,growth=4", num_classes=0)


def _shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_micronet_spec_rebuilds_the_same_architecture():
    model = create("densenet_bc:growth=4,depth=10", num_classes=7, compression=1)
    spec = model.micronet_spec
    assert spec["name"] == "densenet_bc:depth=10,growth=4,compression=1.0"
    assert spec == {"name": spec["name"], "family": "densenet_bc", "num_classes": 7,
                    "kwargs": {"depth": 10, "growth": 4, "compression": 1.0, "bottleneck": True}}
    rebuilt = create(spec["name"], num_classes=spec["num_classes"])
    assert _shapes(rebuilt) == _shapes(model)
    # Passing the resolved kwargs again changes nothing, not even the name.
    again = create(spec["name"], num_classes=7, **spec["kwargs"])
    assert again.micronet_spec == spec


def test_zoo_name_keeps_its_name_and_records_overrides():
    with torch.device("meta"):
        plain = create("wrn28_10", width=10)  # equal to the preset: still the plain zoo name
        wide = create("wrn28_10", width=2)
    assert plain.micronet_spec["name"] == "wrn28_10"
    assert plain.micronet_spec["kwargs"] == {"depth": 28, "width": 10, "conv_bias": False, "stride_first": True}
    assert wide.micronet_spec["name"] == "wrn28_10:width=2"
    with torch.device("meta"):
        assert count_params(create(wide.micronet_spec["name"])) == count_params(wide)
