"""``search``: validate, load the data, open (or resume) the output folder, run the chosen method."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from micronet import models
from micronet.data import detect_layout, get_normalization, load_dataset, stratified_splits
from micronet.errors import MicronetError
from micronet.training.loop import setup_runtime
from micronet.training.policy_search.aws import search_aws
from micronet.training.policy_search.common import SearchSettings, data_identity, open_search
from micronet.training.policy_search.fastaa import optuna_module, search_fastaa


def search(data_root: str | Path, out: str | Path, settings: SearchSettings, *, dataset: str = "auto",
           resume: bool = False, device: str = "auto", splits_subset: list[int] | None = None,
           searched_on: str | None = None, progress: bool = True) -> Path:
    """Search a policy on the training split under ``data_root``; writes ``out/policy.json`` and returns it.

    Everything is checked (settings, data, an existing search's settings) before the first file is written.
    """
    settings.validate()
    if splits_subset is not None and settings.method != "fastaa":
        raise MicronetError("--splits-subset applies to --method fastaa only")
    if splits_subset is not None and any(not 0 <= k < settings.splits for k in splits_subset):
        raise MicronetError(f"--splits-subset must name splits in 0..{settings.splits - 1}, got {splits_subset}")
    out = Path(out)
    layout = detect_layout(data_root, dataset)
    data = load_dataset(data_root, "train", layout)
    normalize = get_normalization(settings.normalization)
    models.create(settings.model, num_classes=data.num_classes)  # an unknown --model fails before any file is written
    rt = setup_runtime(device, amp=None, channels_last=False)
    if rt.distributed:
        raise MicronetError("the search runs one process per device; spread splits with --splits-subset instead "
                            "of torchrun")
    if settings.method == "fastaa":
        optuna_module()  # a missing optuna is reported before open_search writes settings.json
    parts = checked_splits(data.labels, settings)
    name = searched_on or (layout if layout != "folder" else Path(data_root).resolve().name)
    open_search(out, settings, {**data_identity(data), "dataset": name}, resume)
    if settings.method == "aws":
        return search_aws(data, settings, out, rt, normalize, searched_on=name, progress=progress, split=parts[0])
    return search_fastaa(data, settings, out, rt, normalize, searched_on=name, splits_subset=splits_subset,
                         progress=progress, parts=parts)


def checked_splits(labels: Tensor, settings: SearchSettings) -> list[tuple[Tensor, Tensor]]:
    """The search's splits (K for fastaa, one train/validation split for aws); a one-line error if any part is empty."""
    fastaa = settings.method == "fastaa"
    parts = stratified_splits(labels, settings.splits if fastaa else 1, settings.holdout, settings.seed)
    kept, held = ("D_M", "D_A") if fastaa else ("training", "validation")
    for k, (keep_idx, held_idx) in enumerate(parts):
        for part, idx in ((kept, keep_idx), (held, held_idx)):
            if len(idx) == 0:
                where = f"split {k}'s " if fastaa else "the "
                raise MicronetError(f"{where}{part} part is empty ({len(labels)} images, --holdout "
                                    f"{settings.holdout}); use more images per class or another --holdout")
    return parts
