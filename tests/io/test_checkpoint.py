import errno
import os
import pickle

import pytest
import torch

from micronet import io, models
from micronet.compress import QuantConfig, SparsityConfig, compression_layout, freeze_masks_, prune_, quantize_
from micronet.errors import MicronetError

SPEC = "densenet_bc:depth=10,growth=4"

STATES = {
    "float": lambda m: m,
    "masked": lambda m: prune_(m, SparsityConfig(0.7)),
    "block": lambda m: prune_(m, SparsityConfig(0.5, block=(2, 2), gradient="masked")),
    "act-only": lambda m: quantize_(m, QuantConfig(weight_bits=None, act_bits=4),
                                    calibration_data=torch.randn(4, 3, 32, 32)),
    "full": lambda m: quantize_(prune_(m, SparsityConfig(0.75)),
                                QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=6, learn_act_scale=True),
                                calibration_data=torch.randn(4, 3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(STATES))
def test_save_load_round_trips_bit_exactly(tmp_path, name):
    torch.manual_seed(0)
    model = STATES[name](models.create(SPEC)).eval()
    freeze_masks_(model)
    path = io.save(tmp_path / "m.safetensors", model, history=[{"stage": "prune"}], metrics={"top1": 0.5})
    ck = io.load(path)
    restored = ck.model.eval()
    a, b = model.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert compression_layout(restored) == compression_layout(model)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(restored(x), model(x))
    assert ck.history == [{"stage": "prune"}] and ck.metrics == {"top1": 0.5}


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    model = models.create(SPEC)
    path = io.save(tmp_path / "m.safetensors", model, metrics={"v": 1})
    original = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The disk fills up while the new file is flushed: a one-line error, the old file intact.
    monkeypatch.setattr("micronet.io.files.os.fsync", boom)
    with pytest.raises(MicronetError, match="no space left"):
        io.save(path, model, metrics={"v": 2})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_truncated_and_tampered_files_are_refused(tmp_path):
    path = io.save(tmp_path / "m.safetensors", models.create(SPEC))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MicronetError, match="truncated or corrupted|cannot read"):
        io.load(tmp_path / "trunc.safetensors")
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(MicronetError, match="hash"):
        io.load(tmp_path / "tampered.safetensors")
    with pytest.raises(MicronetError, match="does not exist"):
        io.load(tmp_path / "missing.safetensors")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("content", [b'{"a": 1}\n', b"hello, not weights", bytes(range(256)) * 4])
def test_a_file_that_is_not_weights_gets_one_plain_line(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(MicronetError) as info:
        io.load_state_dict_file(path)
    message = str(info.value)
    assert "\n" not in message and "operand" not in message.lower() and "unpickl" not in message.lower()
    assert "not a weights file PyTorch can read" in message or "cannot read" in message
    # the "any file -> model" path must not mistake these bytes for a pickled model that --trust-pickle would open
    with pytest.raises(MicronetError) as info:
        io.load_model(path, model="densenet_bc:depth=10,growth=4")
    assert "trust-pickle" not in str(info.value) and "operand" not in str(info.value).lower()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv.weight": payload}, f)
    # a bare pickle stream (not torch.save's layout) is rejected before any object is rebuilt
    with pytest.raises(MicronetError, match="refused|not a weights file"):
        io.load_state_dict_file(path)
    assert not marker.exists()
    torch.save({"state_dict": {"a": payload}}, tmp_path / "evil2.pt")  # the torch.save zip layout
    with pytest.raises(MicronetError, match="refused to load .*GLOBAL posix.mkdir"):
        io.load_state_dict_file(tmp_path / "evil2.pt")
    assert not marker.exists()
    # sanity check of the oracle: unpickling the file without protection would have run the payload
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_plain_state_dict_and_architecture_mismatch(tmp_path):
    model = models.create(SPEC)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ok.pth")
    sd = io.load_state_dict_file(tmp_path / "ok.pth")
    other = models.create(SPEC)
    io.load_into(other, sd)
    assert all(torch.equal(sd[k], other.state_dict()[k]) for k in sd)
    wrong = models.create("densenet_bc:depth=16,growth=4")
    with pytest.raises(MicronetError, match="missing keys|shape mismatch"):
        io.load_into(wrong, sd)


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = io.save(tmp_path / "m.safetensors", models.create(SPEC))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0o600
