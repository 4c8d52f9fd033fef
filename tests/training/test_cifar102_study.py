"""The CIFAR-10.2 study end to end on tiny files: train-stats normalisation, a tiny Shake-Shake through every
stage, eval/export with the recorded numbers, and eval --also-on with the drop's 95% interval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from micronet import io as mio
from micronet.cli import main
from micronet.data import dataset_stats, load_dataset
from micronet.training import RunOptions, load_recipe, run_all
from micronet.training.evaluate import drop_interval
from tests.data.conftest import write_cifar101, write_cifar102_npz, write_npz

TINY = {
    "name": "tiny-ss", "model": "shakeshake:depth=8,width=4", "dataset": "cifar102", "seed": 0,
    "data": {"normalization": "train-stats"},
    "augment": {"policy": None, "crop_padding": 2, "flip": True, "cutout": 0},
    "train": {"batch_size": 20, "loss": "ce", "grad_clip": 5.0},
    "stages": {
        "student": {"epochs": 1, "lr": 0.05},
        "prune": {"epochs": 1, "lr": 0.01, "sparsity": 0.5},
        "quant-act": {"epochs": 1, "lr": 0.01, "act_bits": 4},
        "quant-weight": {"epochs": 1, "lr": 0.01, "weight_bits": 4},
        "bn-recal": {"batches": 2},
        "prune-fc": {"epochs": 1, "lr": 0.001, "sparsity": 0.5, "scope": "layer"},
        "quant-fc": {"epochs": 1, "lr": 0.001, "weight_bits": 4},
    },
}


def _numpy_stats(root) -> tuple[np.ndarray, np.ndarray]:
    """The study's own formula: np.mean / np.std (ddof 0) of x/255 over the training images, per channel."""
    x = np.load(root / "cifar102_train.npz")["images"] / 255.0  # N×H×W×3 as published
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = write_cifar102_npz(tmp_path_factory.mktemp("c102"), train=40, test=20)
    base = tmp_path_factory.mktemp("run")
    (base / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_all(load_recipe(base / "tiny.yaml"), RunOptions(data_root=root, out=base / "run",
                                                                      progress=False))
    finally:
        torch.set_num_threads(before)
    return root, base / "run", {r.stage: r for r in results}


def test_train_stats_come_from_the_training_split_only(tmp_path):
    root = write_cifar102_npz(tmp_path, train=40, test=20)
    stats = dataset_stats(root, "cifar102")
    mean, std = _numpy_stats(root)
    assert np.allclose(stats["mean"], mean, rtol=0, atol=1e-12) and np.allclose(stats["std"], std, rtol=0, atol=1e-12)
    assert (stats["train_images"], stats["test_images"], stats["classes"]) == (40, 20, 10)
    test = dict(np.load(root / "cifar102_test.npz"))
    test["images"][0, 0, 0] = 255 - test["images"][0, 0, 0]  # change a test pixel
    np.savez(root / "cifar102_test.npz", **test)
    assert dataset_stats(root, "cifar102")["mean"] == stats["mean"]
    write_npz(root / "cifar102_train.npz", 40, 11)  # ... while other training images change them
    assert dataset_stats(root, "cifar102")["mean"] != stats["mean"]


def test_data_stats_cli_prints_the_numbers_and_split_sizes(tmp_path):
    root = write_cifar102_npz(tmp_path, train=40, test=20)
    out = CliRunner().invoke(main, ["data", "stats", "--dataset", "cifar102", "--data-root", str(root), "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert np.allclose(r["mean"], _numpy_stats(root)[0], atol=1e-12) and r["train_images"] == 40
    text = CliRunner().invoke(main, ["data", "stats", "--data-root", str(root), "--subsample", "20"])
    assert text.exit_code == 0 and "20 training images used (40 in the train split)" in text.output
    bad = CliRunner().invoke(main, ["data", "stats", "--data-root", str(tmp_path / "none")])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1


def test_every_stage_records_the_train_stats_numbers(study):
    root, out, results = study
    assert list(results) == ["student", "prune", "quant-act", "quant-weight", "bn-recal", "prune-fc", "quant-fc"]
    mean, std = _numpy_stats(root)
    for stage in results:
        extra = mio.read_header(out / f"{stage}.safetensors")["extra"]
        assert extra["normalization"] == "train-stats"
        assert np.allclose(extra["normalization_stats"]["mean"], mean, atol=1e-12)
        assert np.allclose(extra["normalization_stats"]["std"], std, atol=1e-12)


def test_eval_and_export_use_the_recorded_numbers(study, tmp_path):
    root, out, results = study
    ckpt = out / "quant-fc.safetensors"
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--data-root", str(root), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    reported = json.loads(r.output)
    assert reported["normalization"] == "train-stats" and reported["images"] == 20
    assert reported["top1"] == pytest.approx(results["quant-fc"].metrics["test_top1"])
    mean, std = _numpy_stats(root)
    x = np.load(root / "cifar102_test.npz")["images"][:8].transpose(0, 3, 1, 2) / 255.0
    expected = (x - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    assert np.allclose(mio.checkpoint_test_images(ckpt, root, 8).numpy(), expected, atol=1e-5)
    e = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--data-root", str(root),
                                  "--samples", "16", "--no-timing", "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.output)["parity"]["passed"]


def _labelled_like_the_model(model, images: np.ndarray, norm, accuracy: float, seed: int) -> np.ndarray:
    """Labels that the model gets right with probability ``accuracy`` each (independent draws)."""
    with torch.no_grad():
        pred = model.eval()(norm(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))).argmax(1).numpy()
    right = np.random.default_rng(seed).random(len(images)) < accuracy
    return np.where(right, pred, (pred + 1) % 10).astype(np.int64)


def test_eval_also_on_reports_the_drop_with_an_interval_covering_the_true_difference(study, tmp_path):
    _, out, _ = study
    ckpt = out / "quant-fc.safetensors"
    model, norm = mio.load_model(ckpt), mio.checkpoint_normalization(ckpt)
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_cifar102_npz(a, train=20, test=20)  # a train split, so the root is a cifar102 root
    images_a = rng.integers(0, 256, size=(400, 32, 32, 3), dtype=np.uint8)
    images_b = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    labels_a = _labelled_like_the_model(model, images_a, norm, 0.9, 1)  # true accuracy 90%
    labels_b = _labelled_like_the_model(model, images_b, norm, 0.6, 2)  # true accuracy 60%: true drop 30 points
    np.savez(a / "cifar102_test.npz", images=images_a, labels=labels_a, label_names=np.array([str(i) for i in
                                                                                             range(10)]))
    np.save(b / "cifar10.1_v6_data.npy", images_b)
    np.save(b / "cifar10.1_v6_labels.npy", labels_b)
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--data-root", str(a), "--dataset", "cifar102", "--also-on",
                                  f"cifar101={b}", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    other = rep["also_on"][0]
    observed_a = 100.0 * np.mean(labels_a == _labelled_like_the_model(model, images_a, norm, 1.0, 0))
    observed_b = 100.0 * np.mean(labels_b == _labelled_like_the_model(model, images_b, norm, 1.0, 0))
    assert rep["top1"] == pytest.approx(observed_a) and other["top1"] == pytest.approx(observed_b)
    assert (rep["images"], other["images"], other["dataset"]) == (400, 300, "cifar101")
    low, high = other["drop"]["top1"]["ci95"]
    assert other["drop"]["top1"]["drop"] == pytest.approx(observed_a - observed_b)
    assert low < 30.0 < high and high - low < 15
    table = CliRunner().invoke(main, ["eval", str(ckpt), "--data-root", str(a), "--dataset", "cifar102",
                                      "--also-on", f"cifar101={b}", "--device", "cpu"])
    assert table.exit_code == 0 and "top-1 drop [95% CI]" in table.output and "cifar101" in table.output
    bad = CliRunner().invoke(main, ["eval", str(ckpt), "--data-root", str(a), "--also-on", "imagenet"])
    assert bad.exit_code == 2 and "--also-on 'imagenet'" in bad.output


def test_the_drop_interval_covers_the_true_difference_95_percent_of_the_time():
    # Independent oracle: simulate many pairs of test sets from populations with known accuracies.
    rng = np.random.default_rng(0)
    p_a, p_b, n_a, n_b, trials = 0.93, 0.85, 2000, 1500, 4000
    acc_a = 100.0 * rng.binomial(n_a, p_a, trials) / n_a
    acc_b = 100.0 * rng.binomial(n_b, p_b, trials) / n_b
    covered = 0
    for x, y in zip(acc_a, acc_b, strict=True):
        _, low, high = drop_interval(float(x), n_a, float(y), n_b)
        covered += low <= 100.0 * (p_a - p_b) <= high
    assert 0.935 <= covered / trials <= 0.965


def test_subsample_flag_reaches_the_recipe(tmp_path):
    recipe = load_recipe(_write(tmp_path), sets=["data.subsample=20", "data.subsample_seed=3"])
    assert (recipe.subsample, recipe.subsample_seed, recipe.normalization) == (20, 3, "train-stats")
    with pytest.raises(Exception, match="data.subsample must be"):
        load_recipe(_write(tmp_path), sets=["data.subsample=-1"])
    assert len(load_dataset(write_cifar101(tmp_path), "test", "cifar101")) == 20


def _write(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path
