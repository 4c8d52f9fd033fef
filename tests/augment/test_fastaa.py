"""Fast AutoAugment search: it learns to avoid label-destroying ops, resumes exactly, refuses bad resumes."""

from __future__ import annotations

import json
import shutil

import pytest

from micronet.data import get_normalization
from micronet.errors import MicronetError
from micronet.training.augment import load_policy
from micronet.training.loop import setup_runtime
from micronet.training.policy_search import SearchSettings, open_search, search_fastaa
from micronet.training.policy_search import fastaa as fastaa_module
from micronet.training.policy_search.common import data_identity
from tests.augment.conftest import LABEL_DESTROYING, TINY_MODEL, orientation_images

pytest.importorskip("optuna")


SEEDS = (0, 1, 2, 3)
STARTUP = 5  # TPE's random start-up trials; later trials are the TPE-guided proposals


def _destroying_share(ops: list[str]) -> float:
    return sum(op in LABEL_DESTROYING for op in ops) / len(ops)


def test_tpe_keeps_fewer_label_destroying_ops_than_random_search_with_the_same_budget(tmp_path):
    """Per seed: one data set, split models shared by both samplers (same seed, same splits), 20 trials per split.

    A single seed's kept policy holds 20 ops, so one op is 0.05: too coarse to compare alone (the original
    one-seed test flipped from 0.00 vs 0.05 to 0.05 vs 0.05 when the ops were rewritten). The measure is the
    aggregate over seeds, of the kept policies and of the TPE-guided proposals (where TPE's learning shows;
    random search proposes the prior share 3/15 whatever the rewards).
    """
    rt, norm = setup_runtime("cpu"), get_normalization("fastaa")
    kept: dict[str, list[str]] = {"tpe": [], "random": []}
    guided: dict[str, list[str]] = {"tpe": [], "random": []}
    for seed in SEEDS:
        data = orientation_images(60, seed=seed)
        for sampler in ("tpe", "random"):
            settings = SearchSettings(model=TINY_MODEL, sampler=sampler, epochs=15, batch_size=32, cutout=0,
                                      crop_padding=2, splits=2, trials=20, rounds=1, policies_per_trial=1, top=5,
                                      views=1, startup_trials=STARTUP, seed=seed)
            out = tmp_path / f"{sampler}{seed}"
            open_search(out, settings, data_identity(data), resume=False)
            if sampler == "random":  # same seed, same splits: the split models are the same; reuse them
                for k in range(2):
                    shutil.copytree(tmp_path / f"tpe{seed}" / f"split{k}", out / f"split{k}")
            path = search_fastaa(data, settings, out, rt, norm, searched_on="orientation", progress=False)
            policy = json.loads(path.read_text())
            assert len(policy["policy"]) == 2 * 5  # 2 splits x top 5 x 1 sub-policy (no duplicates within a trial)
            assert len(policy["metadata"]["kept_trials"]) == 10 and policy["searched_on"] == "orientation"
            log = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
            # The reward is informative: each split model is accurate (10 classes; chance is 0.1) on some policy.
            assert all(max(r["top1"] for r in log if r["split"] == k) >= 0.9 for k in range(2)), log
            kept[sampler] += [op.name for sub in load_policy(path).subpolicies for op in sub]
            guided[sampler] += [op[0] for r in log if r["trial"] >= STARTUP for sub in r["policy"] for op in sub]
    shares = {f"{what} {s}": round(_destroying_share(ops[s]), 3) for what, ops in (("kept", kept), ("guided", guided))
              for s in ("tpe", "random")}
    # Measured on seeds 0-3: kept TPE 0.050 vs random 0.088 (4 vs 7 of 80 ops), guided 0.150 vs 0.254. Over seeds
    # 0-11 (one at a time): TPE never kept more than random and always proposed fewer; aggregate kept 0.021 vs
    # 0.063, guided 0.136 vs 0.208.
    assert shares["guided tpe"] <= shares["guided random"] - 0.05, shares
    assert shares["kept tpe"] <= shares["kept random"] - 1 / 80, shares  # at least one op fewer of the 80 kept
    assert shares["guided tpe"] < 3 / 15, shares  # below the prior share (3 of the 15 ops) as well


def _small(**kw) -> SearchSettings:
    base = dict(model=TINY_MODEL, epochs=1, batch_size=32, cutout=0, crop_padding=2, splits=2, trials=4, rounds=2,
                policies_per_trial=2, top=2, views=2, startup_trials=2, seed=3)
    return SearchSettings(**{**base, **kw})


def test_an_interrupted_search_resumes_to_exactly_the_same_policy(tmp_path, monkeypatch):
    data = orientation_images(12, seed=4)
    rt, norm = setup_runtime("cpu"), get_normalization("fastaa")
    settings = _small()
    straight = tmp_path / "straight"
    open_search(straight, settings, data_identity(data), resume=False)
    search_fastaa(data, settings, straight, rt, norm, searched_on="o", progress=False)

    calls = {"n": 0}
    real = fastaa_module.any_of_views_accuracy

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-way through split 0's second round
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(fastaa_module, "any_of_views_accuracy", flaky)
    resumed = tmp_path / "resumed"
    open_search(resumed, settings, data_identity(data), resume=False)
    with pytest.raises(KeyboardInterrupt):
        search_fastaa(data, settings, resumed, rt, norm, searched_on="o", progress=False)
    assert not (resumed / "policy.json").exists()
    open_search(resumed, settings, data_identity(data), resume=True)
    search_fastaa(data, settings, resumed, rt, norm, searched_on="o", progress=False)

    def lines(out):
        return sorted(json.dumps(json.loads(x), sort_keys=True) for x in (out / "trials.jsonl").read_text().split("\n")
                      if x)

    assert lines(straight) == lines(resumed) and len(lines(straight)) == 2 * 2 * 4
    assert json.loads((straight / "policy.json").read_text()) == json.loads((resumed / "policy.json").read_text())


def test_resuming_with_other_settings_is_refused_and_touches_nothing(tmp_path):
    data = orientation_images(4, seed=5)
    out = tmp_path / "s"
    open_search(out, _small(), data_identity(data), resume=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(MicronetError, match="settings differ .*trials"):
        open_search(out, _small(trials=5), data_identity(data), resume=True)
    with pytest.raises(MicronetError, match="already holds a search"):
        open_search(out, _small(), data_identity(data), resume=False)
    with pytest.raises(MicronetError, match="no search to continue"):
        open_search(tmp_path / "new", _small(), data_identity(data), resume=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before and not (tmp_path / "new").exists()
