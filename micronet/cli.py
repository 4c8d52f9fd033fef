"""The `micronet` command line: thin shells over the library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from tabulate import tabulate
from torch import nn

from micronet import __version__, io
from micronet.data import DATASETS, dataset_stats
from micronet.errors import MicronetError
from micronet.export import export_checkpoint
from micronet.models import describe_models, list_families
from micronet.scoring import TRACKS, score
from micronet.scoring.policy import parse_overrides
from micronet.training import (
    DEFAULT_RECIPE,
    STAGES,
    RunOptions,
    apply_projection,
    evaluate_checkpoint,
    load_recipe,
    projection_from_recipe,
    run_all,
    run_stage,
)

_FORMAT = click.Choice(io.FORMATS)
_ALLOW_LARGE = click.option("--allow-large", is_flag=True,
                            help="Build models above the parameter budget (100 M parameters) named by a file or spec.")
_DATASET = click.Choice(["auto", *DATASETS])


class _Group(click.Group):
    """Click group that turns MicronetError into a one-line message and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MicronetError as exc:
            # One line, whatever a file smuggled into the message (a key name with a newline, say).
            click.echo("error: " + " ".join(str(exc).splitlines()), err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="micronet")
def main() -> None:
    """micronet: compressed CIFAR-100 networks, scored exactly by the MicroNet Challenge rules."""


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the table as a JSON list of objects.")
def models_command(as_json: bool) -> None:
    """List the model zoo: parameters and dense MACs per 32x32 image (conv + FC + LSTM)."""
    rows = describe_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [(row["name"], row["family"], row["params"], row["macs"], row["summary"]) for row in rows]
    click.echo(tabulate(table, headers=["name", "family", "params", "dense MACs", "description"], intfmt=","))
    click.echo("Also accepted: FAMILY:key=value,... e.g. densenet_bc:depth=40,growth=12 "
               f"(families: {', '.join(list_families())}).")


@main.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx file.")
@click.option("--form", type=click.Choice(["integer", "qdq"]), default="integer", show_default=True,
              help="integer: convs on integer codes, Round/Clip activations; qdq: activations as Q/DQ pairs.")
@click.option("--sparse-weights", is_flag=True, help="Store sparse weights as bitmask + packed non-zeros.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime checks (weights, logits, batch).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where onnxruntime and PyTorch run for verification and timing.")
@click.option("--samples", type=int, default=512, show_default=True, help="Inputs compared in verification.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="CIFAR-100 folder (cifar-100-python/) for real verification images; default synthetic.")
@click.option("--model", "arch", default=None, help="Architecture (zoo name or spec) for plain state_dicts.")
@click.option("--format", "fmt", type=_FORMAT,
              default="auto", show_default=True, help="Checkpoint format.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-timing", is_flag=True, help="Skip the latency table.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_ALLOW_LARGE
def export_command(checkpoint: str, output: str, form: str, sparse_weights: bool, no_verify: bool, device: str,
                   samples: int, data_root: str | None, arch: str | None, fmt: str, force: bool, no_timing: bool,
                   as_json: bool, allow_large: bool) -> None:
    """Export CHECKPOINT to one small, verified ONNX file (packed INT4 weights, dynamic batch)."""
    report = export_checkpoint(checkpoint, output, format=fmt, model=arch, form=form,
                               sparse_weights=sparse_weights, verify=not no_verify, device=device,
                               samples=samples, data=data_root, force=force, timing=not no_timing,
                               storage=_storage_bytes, allow_large=allow_large)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


@main.command("score")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_name", help="Zoo model or spec (default: densenet100_k12 projected).")
@click.option("--format", "file_format", default="auto", show_default=True,
              type=_FORMAT, help="Checkpoint format.")
@click.option("--recipe", help="Project a recipe's compression onto the untrained --model.")
@click.option("--policy", "-p", default="official", show_default=True,
              help="Accounting policy: official, freebie16, riair2019-t0..t6, or a YAML file.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override a policy field (repeatable).")
@click.option("--track", default="cifar100", show_default=True, type=click.Choice(list(TRACKS)))
@click.option("--input-size", default=32, show_default=True, type=click.IntRange(1), help="Input height = width.")
@click.option("--samples", type=int, help="Examples to average ops over (dynamic nets; default 16 for them).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Real test images for dynamic nets.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the per-layer rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw per-layer contributions (PNG).")
@click.option("--force", is_flag=True, help="Overwrite existing --csv/--plot files.")
@click.option("--all-rows", is_flag=True, help="Print every layer row (default: the first 40).")
@_ALLOW_LARGE
def score_command(checkpoint, model_name, file_format, recipe, policy, sets, track, input_size, samples, data_root,
                  as_json, csv_path, plot_path, force, all_rows, allow_large) -> None:
    """Score a model by the MicroNet rules: params and ops in 32-bit units, per layer."""
    overrides = parse_overrides(sets)
    for out in (csv_path, plot_path):  # refuse a bad output path before the (long) scoring run
        if out:
            io.check_output_path(out, force)
    target, name, notes = _score_target(checkpoint, model_name, file_format, recipe, allow_large)
    data = io.checkpoint_test_images(checkpoint, data_root, samples or 16) if data_root else None
    report = score(target, policy, track, input_size, samples=samples, data=data, model_name=name, **overrides)
    report.notes[:0] = notes
    if csv_path:
        report.write_csv(csv_path, force=force)
    if plot_path:
        report.plot(plot_path, force=force)
    click.echo(report.to_json() if as_json else report.table(None if all_rows else 40))


def _storage_bytes(model: nn.Module) -> int:
    """The challenge's storage figure of ``model``: its scored params (32-bit units) x 4 bytes."""
    return round(float(score(model).params) * 4)


def _score_target(checkpoint: str | None, model: str | None, format: str, recipe: str | None,
                  allow_large: bool = False) -> tuple[nn.Module, str, list[str]]:
    """What `score` scores: a file, a zoo model (optionally projected through a recipe), or by default
    ``densenet100_k12`` under the 2019 recipe's compression. Returns (model, name, notes)."""
    if checkpoint is not None:
        if recipe is not None:
            raise MicronetError("--recipe projects an untrained zoo model; it cannot be combined with a checkpoint")
        loaded = io.load_model(checkpoint, format=format, model=model, allow_large=allow_large)
        spec = getattr(loaded, "micronet_spec", None) or {}
        return loaded, f"{Path(checkpoint).name} ({spec.get('name', type(loaded).__name__)})", []
    name = model or "densenet100_k12"
    with torch.random.fork_rng(devices=[]):
        # Untrained weights decide where global pruning puts the zeros: seed them so the figures repeat.
        torch.manual_seed(0)
        net = io.create_model(name, allow_large=allow_large)
    if model is not None and recipe is None:
        return net, name, []
    projection = projection_from_recipe(recipe)
    apply_projection(net, projection)
    note = "PROJECTION: " + projection.describe() + "; train the model for its real score"
    if recipe is None:
        note += f" (default target: {name} under {DEFAULT_RECIPE})"
    return net, name, [note]


@main.command("train-stage")
@click.argument("stage", type=click.Choice([*STAGES, "all"]))
@click.option("--recipe", "-r", required=True, help="Recipe YAML file or shipped name (micronet2019-densenet).")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Dataset folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default runs/RECIPE).")
@click.option("--from", "init_from", type=click.Path(dir_okay=False), help="Previous stage's checkpoint.")
@click.option("--teacher", type=click.Path(dir_okay=False), help="Teacher checkpoint for distillation.")
@click.option("--resume", is_flag=True, help="Continue an interrupted stage from OUT/STAGE.safetensors.")
@click.option("--model", help="Override the recipe's model (zoo name or FAMILY:key=value spec).")
@click.option("--teacher-model", help="Override the recipe's teacher architecture.")
@click.option("--epochs", type=int, help="Epochs of every stage run (warm-up keeps its fraction).")
@click.option("--batch-size", type=int, help="Per-process batch size of every stage run.")
@click.option("--lr", type=float, help="Peak learning rate of every stage run.")
@click.option("--dataset", type=_DATASET, help="Dataset layout.")
@click.option("--subsample", type=click.IntRange(1), help="Train on a stratified subset of N training images.")
@click.option("--subsample-seed", type=int, help="Seed of the --subsample draw (default: the recipe's, else 0).")
@click.option("--seed", type=int, help="Override the recipe's seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any recipe key, e.g. stages.quant-fc.weight_bits=6 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model (CUDA).")
@click.option("--no-amp", is_flag=True, help="Train in fp32 on CUDA (default: bf16 autocast).")
@click.option("--workers", type=int, default=0, show_default=True, help="CPU DataLoader workers.")
@click.option("--download", is_flag=True, help="Download CIFAR into --data-root if it is missing.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard scalars under OUT/tensorboard.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train_stage_command(stage, recipe, data_root, out_dir, init_from, teacher, resume, model, teacher_model, epochs,
                        batch_size, lr, dataset, subsample, subsample_seed, seed, sets, device, use_compile, no_amp,
                        workers, download, tensorboard, no_progress) -> None:
    """Run one compression stage, or `all` of them in order (resumable), as the recipe says."""
    overrides = {"model": model, "teacher_model": teacher_model, "epochs": epochs, "batch_size": batch_size,
                 "lr": lr, "dataset": dataset, "seed": seed, "stages_only": None if stage == "all" else [stage]}
    data_sets = [f"data.{key}={value}" for key, value in (("subsample", subsample), ("subsample_seed", subsample_seed))
                 if value is not None]
    spec = load_recipe(recipe, overrides, [*data_sets, *sets])
    options = RunOptions(
        data_root=Path(data_root), out=Path(out_dir or Path("runs") / spec.name),
        init_from=Path(init_from) if init_from else None, teacher=Path(teacher) if teacher else None,
        resume=resume, device=device, amp=False if no_amp else None, compile=use_compile, num_workers=workers,
        download=download, tensorboard=tensorboard, progress=not no_progress,
    )
    results = run_all(spec, options) if stage == "all" else [run_stage(stage, spec, options)]
    for r in results:
        shown = {k: round(v, 2) for k, v in r.metrics.items() if k in ("val_top1", "test_top1", "test_top5")}
        click.echo(f"{r.stage:<13} {'(done before) ' if r.skipped else ''}{r.path}  {shown}")


@main.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Dataset folder.")
@click.option("--dataset", type=_DATASET, default="auto",
              show_default=True)
@click.option("--format", "fmt", type=_FORMAT, default="auto",
              show_default=True, help="Checkpoint format.")
@click.option("--model", help="Architecture of a plain state_dict (zoo name or spec).")
@click.option("--normalization", help="Input normalization preset (default: what the checkpoint was trained with).")
@click.option("--half", is_flag=True, help="Evaluate in fp16 (weights and inputs).")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--also-on", "also_on", multiple=True, metavar="NAME[=DIR]",
              help="Also evaluate on this dataset's test set (same classes) and report the accuracy drop with its "
                   "95% interval; under --data-root unless =DIR is given (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_ALLOW_LARGE
def eval_command(checkpoint, data_root, dataset, fmt, model, normalization, half, batch_size, device, also_on,
                 as_json, allow_large) -> None:
    """Top-1/top-5 accuracy of a checkpoint on the test set (and on others with --also-on)."""
    r = evaluate_checkpoint(checkpoint, data_root, dataset=dataset, format=fmt, model=model,
                            normalization=normalization, half=half, device=device, batch_size=batch_size,
                            also_on=also_on, allow_large=allow_large)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
        return
    click.echo(f"{r['checkpoint']} ({r['format']}, {r['normalization']} inputs{', fp16' if half else ''}): "
               f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  on {r['images']} test images")
    if "also_on" in r:
        rows = [(r["dataset"], r["images"], r["top1"], r["top5"], "", "")]
        for o in r["also_on"]:
            d1, d5 = o["drop"]["top1"], o["drop"]["top5"]
            rows.append((o["dataset"], o["images"], o["top1"], o["top5"],
                         f"{d1['drop']:+.2f} [{d1['ci95'][0]:+.2f}, {d1['ci95'][1]:+.2f}]",
                         f"{d5['drop']:+.2f} [{d5['ci95'][0]:+.2f}, {d5['ci95'][1]:+.2f}]"))
        click.echo(tabulate(rows, headers=["test set", "images", "top-1 %", "top-5 %", "top-1 drop [95% CI]",
                                           "top-5 drop [95% CI]"], floatfmt=".2f"))
        click.echo(f"drop = first set - this set, in points; interval: {r['drop_method']}")


@main.group("data")
def data_group() -> None:
    """Datasets: inspect what --data-root holds."""


@data_group.command("stats")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Dataset folder.")
@click.option("--dataset", type=_DATASET, default="auto", show_default=True)
@click.option("--subsample", type=click.IntRange(1), help="Stratified subset of N training images first.")
@click.option("--subsample-seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=float, default=0, show_default=True,
              help="Hold out this fraction (<1) or count of training images, as a recipe's data.holdout does.")
@click.option("--holdout-seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def data_stats_command(data_root, dataset, subsample, subsample_seed, holdout, holdout_seed, as_json) -> None:
    """train-stats normalisation (per-channel mean and population std of x/255 on the training split only)."""
    r = dataset_stats(data_root, dataset, subsample_to=subsample or 0, subsample_seed=subsample_seed,
                      holdout=holdout, holdout_seed=holdout_seed)
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
        return
    click.echo(f"{r['dataset']} under {r['data_root']}: {r['train_images']} training images used "
               f"({r['train_split_images']} in the train split), {r['holdout_images']} held out, "
               f"{r['test_images']} test images, {r['classes']} classes")
    click.echo(tabulate([("mean", *r["mean"]), ("std", *r["std"])], headers=["train-stats", "R", "G", "B"],
                        floatfmt=".8f"))

