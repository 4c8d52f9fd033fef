"""Fast AutoAugment (Lim et al., NeurIPS 2019): policy search by density matching, run with optuna.

For each of K stratified splits (D_M, D_A): a model trained on D_M with the baseline augmentation only;
then T rounds of B trials. A trial proposes ``policies_per_trial`` sub-policies of ``ops`` operations (op from
the 15-op set, probability and level in [0, 1]) and is scored by the split model's top-1 on D_A augmented
with the candidate (plus the baseline transforms), counting an image correct when any of V views is (the
official search's rule). The top N trials of each round are kept, each trial's sub-policies de-duplicated
by their op-name sequence (the official ``remove_deplicates``), and everything concatenated.

Resume is exact: optuna's SQLite storage holds the trial history, split models are saved once trained,
and every random draw is derived from (seed, split, round, trial) - the sampler is re-seeded per trial
from the number of trials already complete, so an interrupted and a straight run propose the same.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from micronet.data import ImageSet, Normalization, stratified_splits
from micronet.errors import MicronetError
from micronet.training.batches import derive_seed
from micronet.training.loop import Runtime
from micronet.training.policy_search.common import (
    SearchSettings,
    any_of_views_accuracy,
    append_log,
    baseline_augmentation,
    load_model,
    make_policy,
    save_model,
    train_model,
    with_policy,
    write_policy,
)

# Fast AutoAugment's operation set (its augment_list for CIFAR, without SamplePairing): spec training.md §4.2.
FASTAA_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Invert", "Equalize",
              "Solarize", "Posterize", "Contrast", "Color", "Brightness", "Sharpness", "Cutout")


def optuna_module():
    """optuna, or a one-line error naming the extra that installs it."""
    # optuna is an optional, heavy dependency (pip install micronet[search]): imported only when a search runs.
    try:
        import optuna
    except ImportError:
        raise MicronetError("`micronet augment search --method fastaa` needs optuna (pip install 'micronet[search]')"
                            ) from None
    optuna.logging.set_verbosity(logging.WARNING)
    return optuna


def _sampler(optuna, settings: SearchSettings, split: int, round_: int, done: int):
    seed = derive_seed(settings.seed, split, round_, done) % 2**32
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def propose(trial, settings: SearchSettings) -> list[list[list]]:
    """A trial's candidate: ``policies_per_trial`` sub-policies of ``ops`` ``[op, probability, level]``."""
    subs = []
    for t in range(settings.policies_per_trial):
        subs.append([[trial.suggest_categorical(f"p{t}_op{j}", FASTAA_OPS),
                      trial.suggest_float(f"p{t}_prob{j}", 0.0, 1.0),
                      trial.suggest_float(f"p{t}_level{j}", 0.0, 1.0)] for j in range(settings.ops)])
    return subs


def decode(params: dict[str, Any], settings: SearchSettings) -> list[list[list]]:
    """The sub-policies of a finished trial, from its stored parameters."""
    return [[[params[f"p{t}_op{j}"], params[f"p{t}_prob{j}"], params[f"p{t}_level{j}"]] for j in range(settings.ops)]
            for t in range(settings.policies_per_trial)]


def remove_duplicates(subs: list[list[list]]) -> list[list[list]]:
    """Keep the first sub-policy of each op-name sequence (the official search's de-duplication)."""
    seen, kept = set(), []
    for sub in subs:
        key = tuple(op[0] for op in sub)
        if key not in seen:
            seen.add(key)
            kept.append(sub)
    return kept


def _storage(optuna, out: Path):
    """optuna's SQLite storage in ``out/search.db``, in WAL mode without an fsync per commit.

    optuna commits every suggested parameter; with SQLite's default (an fsync per commit) that cost more
    than scoring a trial on a small CPU run. WAL + synchronous=NORMAL survives a killed process (what
    --resume is for) and lets one process per GPU share the file on one machine.
    """
    path = str((out / "search.db").resolve())

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=120)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})


def _study(optuna, storage, split: int, round_: int):
    return optuna.create_study(storage=storage, study_name=f"split{split}-round{round_}", direction="maximize",
                               load_if_exists=True)


def _complete(optuna, study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def search_fastaa(data: ImageSet, settings: SearchSettings, out: Path, rt: Runtime, normalize: Normalization, *,
                  searched_on: str, splits_subset: list[int] | None = None, progress: bool = True,
                  parts: list[tuple[Tensor, Tensor]] | None = None) -> Path:
    """Run (or continue) a Fast AutoAugment search in ``out``; returns the written ``out/policy.json``."""
    optuna = optuna_module()
    from tqdm.auto import tqdm

    chosen = list(range(settings.splits)) if splits_subset is None else sorted(set(splits_subset))
    if any(not 0 <= k < settings.splits for k in chosen):
        raise MicronetError(f"--splits-subset must name splits in 0..{settings.splits - 1}, got {splits_subset}")
    storage = _storage(optuna, out)
    log = out / "trials.jsonl"
    baseline = baseline_augmentation(settings)
    if parts is None:
        parts = stratified_splits(data.labels, settings.splits, settings.holdout, settings.seed)
    for k in chosen:
        keep_idx, held_idx = parts[k]
        model_path = out / f"split{k}" / "model.safetensors"
        if model_path.is_file():
            model = load_model(model_path, rt)
        else:
            model = train_model(settings.model, data.subset(keep_idx), settings, rt, normalize, baseline,
                                derive_seed(settings.seed, k, 101), progress=progress, describe=f"split {k} model")
            save_model(model_path, model, {"split": k, "settings": settings.to_dict()})
        held = data.subset(held_idx)
        for r in range(settings.rounds):
            study = _study(optuna, storage, k, r)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                # Left running by an interrupted process (one process owns a split): TPE must not see it,
                # so the resumed search proposes exactly what an uninterrupted one would have.
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            done = len(_complete(optuna, study))
            bar = tqdm(total=settings.trials, initial=done, desc=f"split {k} round {r + 1}/{settings.rounds}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            while done < settings.trials:
                study.sampler = _sampler(optuna, settings, k, r, done)
                trial = study.ask()
                subs = propose(trial, settings)
                augment = with_policy(make_policy(subs), baseline)
                with torch.random.fork_rng(devices=[]):
                    top1 = any_of_views_accuracy(model, held, augment, settings.views,
                                                 derive_seed(settings.seed, k, r, done), normalize, rt,
                                                 settings.eval_batch_size)
                study.tell(trial, top1)
                append_log(log, {"split": k, "round": r, "trial": done, "top1": top1, "policy": subs})
                done += 1
                bar.update(1)
                bar.set_postfix(best=f"{study.best_value:.4f}")
            bar.close()
    return collect_fastaa(settings, out, searched_on=searched_on)


def collect_fastaa(settings: SearchSettings, out: Path, *, searched_on: str) -> Path:
    """Concatenate the top-N trials of every finished split and round into ``out/policy.json``."""
    optuna = optuna_module()
    storage = _storage(optuna, out)
    subs: list[list[list]] = []
    kept: list[dict[str, Any]] = []
    finished = []
    for k in range(settings.splits):
        rounds = []
        for r in range(settings.rounds):
            try:
                study = optuna.load_study(study_name=f"split{k}-round{r}", storage=storage)
            except KeyError:
                break
            trials = _complete(optuna, study)
            if len(trials) < settings.trials:
                break
            # Trials are named by their place among the completed ones (what the log calls "trial"): an
            # interrupted, failed trial shifts optuna's numbers but not these.
            ranked = sorted(enumerate(sorted(trials, key=lambda t: t.number)), key=lambda it: (-it[1].value, it[0]))
            rounds.append(ranked[: settings.top])
        if len(rounds) < settings.rounds:
            continue
        finished.append(k)
        for r, best in enumerate(rounds):
            for index, t in best:
                subs.extend(remove_duplicates(decode(t.params, settings)))
                kept.append({"split": k, "round": r, "trial": index, "top1": t.value})
    if not subs:
        raise MicronetError(f"{out}: no split has finished its trials yet; nothing to write")
    metadata = {"method": "fastaa", "sampler": settings.sampler, "dataset": searched_on, "model": settings.model,
                "seed": settings.seed, "splits_done": finished, "budget": settings.to_dict(), "kept_trials": kept}
    return write_policy(out / "policy.json", subs, name=f"fastaa-{settings.sampler}-{searched_on}",
                        searched_on=searched_on, metadata=metadata)
