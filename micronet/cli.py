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
from micronet.compress.integer import INPUTS
from micronet.compress.pixel_input import LAYOUTS, missing_normalization
from micronet.data import DATASETS, Normalization, dataset_stats, get_normalization, load_dataset
from micronet.errors import MicronetError
from micronet.export import export_checkpoint
from micronet.models import describe_models, list_families
from micronet.scoring import INPUT_DTYPES, TRACKS, score
from micronet.scoring.policy import parse_overrides
from micronet.scoring.report import format_gate_summary, plot_gate_summary
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
from micronet.training.augment import load_policy
from micronet.training.policy_search import SearchSettings, plot_policy, policy_summary, search
from micronet.training.provenance import run_chain

_FORMAT = click.Choice(io.FORMATS)
_ALLOW_LARGE = click.option("--allow-large", is_flag=True,
                            help="Build models above the parameter budget (100 M parameters) named by a file or spec.")
_DATASET = click.Choice(["auto", *DATASETS])


def _MODEL_INPUT(command):  # noqa: N802 (a decorator, named like the other shared options)
    """--input, --layout and --normalization: one definition for `export` and `score`, read by _model_input."""
    options = [
        click.option("--input", "model_input", type=click.Choice(INPUTS), default="float", show_default=True,
                     help="float: normalised float images; pixels: uint8 images, the normalisation folded into an "
                          "exact first layer (8-bit model input)."),
        click.option("--layout", type=click.Choice(LAYOUTS), default="nchw", show_default=True,
                     help="Image layout of --input pixels."),
        click.option("--normalization", default=None,
                     help="Normalisation preset for --input pixels (default: the one the checkpoint records)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _model_input(model_input: str, layout: str, normalization: str | None, checkpoint: str | None, fmt: str,
                 ) -> Normalization | None:
    """Check the --input/--layout/--normalization combination before any model is loaded; for pixel input, the
    normalisation to fold in (the named preset, else the one ``checkpoint`` records)."""
    if model_input != "pixels":
        if layout != "nchw":
            raise MicronetError(f"--layout {layout} needs --input pixels (float input is NCHW)")
        if normalization is not None:
            raise MicronetError("--normalization needs --input pixels (float input is already normalised)")
        return None
    if normalization is not None:
        return get_normalization(normalization)
    norm = io.recorded_normalization(checkpoint, fmt) if checkpoint is not None else None
    if norm is None:
        raise missing_normalization(Path(checkpoint).name if checkpoint is not None else "a zoo model (no checkpoint)")
    return norm


class _Group(click.Group):
    """Click group that turns MicronetError and click's usage errors into one-line messages and a non-zero exit."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Run the command line; usage errors print ``error: ...`` on one line and exit 2 (``--help`` unchanged)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group (`micronet runs`): its help is the answer
                click.echo(exc.format_message(), err=True)
                sys.exit(2)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message().strip()}{where}".replace("\n", " "), err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message().strip()}".replace("\n", " "), err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)

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
@click.option("--sparse-weights", is_flag=True,
              help="Store each weight tensor in its smallest encoding (bitmask or Rice-coded gaps + non-zeros, "
              "bit-packed codes), decoded in the graph.")
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
@click.option("--force-extension", is_flag=True, help="Allow an -o name that does not end in .onnx.")
@click.option("--no-timing", is_flag=True, help="Skip the latency table.")
@_MODEL_INPUT
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-progress", is_flag=True, help="No status bar (it is shown only on a terminal anyway).")
@_ALLOW_LARGE
def export_command(checkpoint: str, output: str, form: str, sparse_weights: bool, no_verify: bool, device: str,
                   samples: int, data_root: str | None, arch: str | None, fmt: str, force: bool,
                   force_extension: bool, no_timing: bool, model_input: str, layout: str, normalization: str | None,
                   as_json: bool, no_progress: bool, allow_large: bool) -> None:
    """Export CHECKPOINT to one small, verified ONNX file (packed INT4 weights, dynamic batch)."""
    if Path(output).suffix.lower() != ".onnx" and not force_extension:
        raise MicronetError(f"-o {output}: export writes an ONNX model, so the name should end in .onnx "
                            "(pass --force-extension to keep this name)")
    norm = _model_input(model_input, layout, normalization, checkpoint, fmt)
    report = export_checkpoint(checkpoint, output, format=fmt, model=arch, form=form,
                               sparse_weights=sparse_weights, verify=not no_verify, device=device,
                               samples=samples, data=data_root, force=force, timing=not no_timing,
                               storage=_storage_bytes, allow_large=allow_large, progress=_progress(no_progress),
                               input=model_input, layout=layout, normalization=norm)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


@main.command("score")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_name",
              help="Zoo model or spec, torchvision:NAME, timm:NAME, module.path:callable or file.py:callable "
                   "(default: densenet100_k12 projected).")
@click.option("--model-arg", "model_arg_items", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for an external model's factory (repeatable).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow CHECKPOINT to be a whole pickled module; unpickling runs code from the file.")
@click.option("--format", "file_format", default="auto", show_default=True,
              type=_FORMAT, help="Checkpoint format.")
@click.option("--recipe", help="Project a recipe's compression onto the untrained --model.")
@click.option("--policy", "-p", default="official", show_default=True,
              help="Accounting policy: official, freebie16, riair2019-t0..t6, or a YAML file.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override a policy field (repeatable).")
@click.option("--track", default="cifar100", show_default=True, type=click.Choice(list(TRACKS)))
@click.option("--input-size", default=None, metavar="H[xW]",
              help="Input image size (default: the track's, cifar100 32, imagenet 224).")
@click.option("--input-shape", default=None, metavar="D1xD2...",
              help="Example shape without batch for non-image models, e.g. 16x64 (sequence of 16 x 64).")
@click.option("--input-dtype", type=click.Choice(list(INPUT_DTYPES)), default=None,
              help="Input dtype (default: the model's float dtype); int64 for token ids, drawn below the smallest "
                   "embedding table, charged at their width.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) when any op has no cost rule.")
@click.option("--samples", type=int, help="Examples to average ops over (dynamic nets; default 16 for them).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Real test images for dynamic nets.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the per-layer rows as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw per-layer contributions (PNG).")
@click.option("--force", is_flag=True, help="Overwrite existing --csv/--plot files.")
@click.option("--all-rows", is_flag=True, help="Print every layer row (default: the first 40).")
@click.option("--no-progress", is_flag=True, help="No status bar (it is shown only on a terminal anyway).")
@_MODEL_INPUT
@_ALLOW_LARGE
def score_command(checkpoint, model_name, model_arg_items, trust_pickle, file_format, recipe, policy, sets, track,
                  input_size, input_shape, input_dtype, strict, samples, data_root, as_json, csv_path, plot_path,
                  force, all_rows, no_progress, model_input, layout, normalization, allow_large) -> None:
    """Score a model by the MicroNet rules: params and ops in 32-bit units, per layer."""
    overrides = parse_overrides(sets)
    model_args = io.parse_model_args(model_arg_items)
    size = _dims(input_size, "--input-size") if input_size else None
    if size is not None and len(size) not in (1, 2):
        raise MicronetError(f"--input-size must be H or HxW, got {input_size!r}")
    shape = (1, *_dims(input_shape, "--input-shape")) if input_shape else None
    norm = _model_input(model_input, layout, normalization, checkpoint, file_format)
    if norm is not None and (size is not None or shape is not None or input_dtype is not None or track != "cifar100"):
        # the pixel form folds a CIFAR normalisation preset into its first layer and takes 32x32 images
        raise MicronetError("--input pixels scores 32x32 RGB uint8 images (the cifar100 track); it cannot be combined "
                            "with --track imagenet, --input-size, --input-shape or --input-dtype")
    for out in (csv_path, plot_path):  # refuse a bad output path before the (long) scoring run
        if out:
            io.check_output_path(out, force)
    target, name, notes = _score_target(checkpoint, model_name, file_format, recipe, trust_pickle, model_args,
                                        allow_large)
    data = _score_images(checkpoint, data_root, samples or 16, norm is not None, layout) if data_root else None
    report = score(target, policy, track, None if size is None else (size[0], size[-1]), samples=samples, data=data,
                   input_shape=shape, input_dtype=input_dtype, strict=strict, model_name=name,
                   progress=_progress(no_progress), input=model_input, normalization=norm, layout=layout,
                   **overrides)
    report.notes[:0] = notes
    if csv_path:
        report.write_csv(csv_path, force=force)
    if plot_path:
        report.plot(plot_path, force=force)
    click.echo(report.to_json() if as_json else report.table(None if all_rows else 40))


def _score_images(checkpoint: str | None, root: str, samples: int, pixels: bool, layout: str) -> torch.Tensor:
    """Real test images for scoring: normalised as the checkpoint expects, or raw uint8 ones in ``layout`` for a
    pixel-input model (which normalises them itself)."""
    if not pixels:
        return io.checkpoint_test_images(checkpoint, root, samples)
    images = load_dataset(root, "test").images[:samples]
    return images.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else images


def _dims(text: str, option: str) -> tuple[int, ...]:
    """'224', '160x224' or '16,64' -> positive ints, else a one-line error."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise MicronetError(f"{option} expects integers like 224 or 160x224, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise MicronetError(f"{option} dimensions must be positive, got {text!r}")
    return dims


def _storage_bytes(model: nn.Module) -> int:
    """The challenge's storage figure of ``model``: its scored params (32-bit units) x 4 bytes."""
    return round(float(score(model).params) * 4)


def _score_target(checkpoint: str | None, model: str | None, format: str, recipe: str | None,
                  trust_pickle: bool = False, model_args: dict | None = None, allow_large: bool = False,
                  ) -> tuple[nn.Module, str, list[str]]:
    """What `score` scores: a file, a zoo model (optionally projected through a recipe), or by default
    ``densenet100_k12`` under the 2019 recipe's compression. Returns (model, name, notes)."""
    if checkpoint is not None:
        if recipe is not None:
            raise MicronetError("--recipe projects an untrained zoo model; it cannot be combined with a checkpoint")
        loaded = io.load_model(checkpoint, format=format, model=model, trust_pickle=trust_pickle,
                               model_args=model_args, allow_large=allow_large)
        spec = getattr(loaded, "micronet_spec", None) or {}
        return loaded, f"{Path(checkpoint).name} ({spec.get('name', type(loaded).__name__)})", []
    name = model or "densenet100_k12"
    with torch.random.fork_rng(devices=[]):
        # Untrained weights decide where global pruning puts the zeros: seed them so the figures repeat.
        torch.manual_seed(0)
        net = io.create_model(name, model_args=model_args, allow_large=allow_large)
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
@click.option("--overwrite", is_flag=True,
              help="Replace a finished OUT/STAGE.safetensors (kept as STAGE.prev.safetensors until the new one is "
                   "complete).")
@click.option("--rerun-from", type=click.Choice(STAGES),
              help="all: recompute this stage and every later one (after a recipe, data or input change).")
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
@click.option("--strict-track", is_flag=True,
              help="Refuse an augmentation policy searched on another dataset than the track (default: warn).")
@click.option("--json", "as_json", is_flag=True, help="Print the stage results as a JSON list.")
def train_stage_command(stage, recipe, data_root, out_dir, init_from, teacher, resume, overwrite, rerun_from, model,
                        teacher_model, epochs, batch_size, lr, dataset, subsample, subsample_seed, seed, sets, device,
                        use_compile, no_amp, workers, download, tensorboard, no_progress, strict_track,
                        as_json) -> None:
    """Run one compression stage, or `all` of them in order (resumable), as the recipe says.

    A finished stage is reused only when its recorded fingerprint (recipe settings, model, data and split, seed,
    input checkpoints, micronet version) matches; otherwise the run stops before any work and says what changed.
    """
    if rerun_from is not None and stage != "all":
        raise MicronetError("--rerun-from belongs to `train-stage all`; for one stage use --overwrite")
    overrides = {"model": model, "teacher_model": teacher_model, "epochs": epochs, "batch_size": batch_size,
                 "lr": lr, "dataset": dataset, "seed": seed, "stages_only": None if stage == "all" else [stage]}
    data_sets = [f"data.{key}={value}" for key, value in (("subsample", subsample), ("subsample_seed", subsample_seed))
                 if value is not None]
    spec = load_recipe(recipe, overrides, [*data_sets, *sets], strict_track=strict_track)
    options = RunOptions(
        data_root=Path(data_root), out=Path(out_dir or Path("runs") / spec.name),
        init_from=Path(init_from) if init_from else None, teacher=Path(teacher) if teacher else None,
        resume=resume, overwrite=overwrite, rerun_from=rerun_from, device=device, amp=False if no_amp else None,
        compile=use_compile, num_workers=workers, download=download, tensorboard=tensorboard,
        progress=_progress(no_progress),
    )
    results = run_all(spec, options) if stage == "all" else [run_stage(stage, spec, options)]
    if as_json:
        click.echo(json.dumps([{"stage": r.stage, "path": str(r.path), "reused": r.skipped, "metrics": r.metrics}
                               for r in results], indent=2, sort_keys=True))
        return
    rows = [(r.stage, "reused" if r.skipped else "trained", *(r.metrics.get(k) for k in _ACCURACY), str(r.path))
            for r in results]
    click.echo(tabulate(rows, headers=["stage", "this run", "val top-1 %", "test top-1 %", "test top-5 %",
                                       "checkpoint"], floatfmt=".2f", missingval="-"))


_ACCURACY = ("val_top1", "test_top1", "test_top5")


def _progress(no_progress: bool) -> bool:
    """Progress bars only for a person watching a terminal (not in pipes, logs or CI), unless --no-progress."""
    return not no_progress and sys.stderr.isatty()


@main.group("runs")
def runs_group() -> None:
    """Training runs: what produced each stage checkpoint in a run folder."""


@runs_group.command("show")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the chain as a JSON list.")
def runs_show_command(run_dir: str, as_json: bool) -> None:
    """The stage chain in RUN_DIR: stage, status, fingerprint, accuracy, time, and whether each input is linked."""
    rows = run_chain(run_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    hashes = {row["stage"]: row["content_sha256"] for row in rows}
    table = []
    for i, row in enumerate(rows):
        before = rows[i - 1]["stage"] if i else None
        linked = "-" if row["from"] is None else ("yes" if row["from"] == hashes.get(before) else "NO (stale)")
        fingerprint = (row["fingerprint"] or "none")[:12]
        seconds = row["seconds"]
        table.append((row["stage"], row["status"], fingerprint, linked,
                      *(row["metrics"].get(k) for k in _ACCURACY),
                      None if seconds is None else f"{seconds:,.0f} s", row["finished"] or "-"))
    click.echo(tabulate(table, headers=["stage", "status", "fingerprint", "input = previous file", "val top-1 %",
                                        "test top-1 %", "test top-5 %", "took", "finished"],
                        floatfmt=".2f", missingval="-"))


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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Gated models: draw per-gate rates and the executed-blocks / MACs-per-image histograms (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_ALLOW_LARGE
def eval_command(checkpoint, data_root, dataset, fmt, model, normalization, half, batch_size, device, also_on,
                 plot_path, as_json, allow_large) -> None:
    """Top-1/top-5 accuracy of a checkpoint on the test set (and on others with --also-on)."""
    r = evaluate_checkpoint(checkpoint, data_root, dataset=dataset, format=fmt, model=model,
                            normalization=normalization, half=half, device=device, batch_size=batch_size,
                            also_on=also_on, allow_large=allow_large)
    if plot_path:
        if "gates" not in r:
            raise MicronetError("--plot draws the gate report of a gated model; this model has no gates")
        plot_gate_summary(r["gates"], plot_path, title=f"{Path(checkpoint).name}: top-1 {r['top1']:.2f}%")
    if as_json:
        click.echo(json.dumps(r, sort_keys=True))
        return
    click.echo(f"{r['checkpoint']} ({r['format']}, {r['normalization']} inputs{', fp16' if half else ''}): "
               f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  on {r['images']} test images")
    if "gates" in r:
        click.echo(format_gate_summary(r["gates"]))
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


@main.group("augment", cls=_Group)
def augment_group() -> None:
    """Search augmentation policies on your data (Fast AutoAugment, AWS AutoAugment, random) and inspect them."""


_DEFAULTS = SearchSettings()


@augment_group.command("search")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Dataset folder (train split).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Search folder.")
@click.option("--method", default="fastaa", show_default=True, help="fastaa or aws.")
@click.option("--sampler", default="tpe", show_default=True,
              help="fastaa: tpe (Fast AutoAugment) or random (the random-search baseline).")
@click.option("--model", default=_DEFAULTS.model, show_default=True, help="Zoo model or FAMILY:key=value spec.")
@click.option("--dataset", type=_DATASET, default="auto", show_default=True)
@click.option("--normalization", default=_DEFAULTS.normalization, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True,
              help="Epochs of each split model (fastaa) or of the shared model (aws).")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--crop-padding", type=int, default=_DEFAULTS.crop_padding, show_default=True,
              help="Baseline augmentation: random-crop padding (0: no crop).")
@click.option("--cutout", type=int, default=_DEFAULTS.cutout, show_default=True,
              help="Baseline augmentation: Cutout square side (0: no Cutout).")
@click.option("--eval-batch-size", type=int, default=_DEFAULTS.eval_batch_size, show_default=True)
@click.option("--splits", type=int, default=_DEFAULTS.splits, show_default=True, help="fastaa: K.")
@click.option("--holdout", type=float, default=_DEFAULTS.holdout, show_default=True,
              help="Held-out fraction: D_A (fastaa) or the validation split (aws).")
@click.option("--trials", type=int, default=_DEFAULTS.trials, show_default=True, help="fastaa: B per split and round.")
@click.option("--rounds", type=int, default=_DEFAULTS.rounds, show_default=True, help="fastaa: T.")
@click.option("--policies-per-trial", type=int, default=_DEFAULTS.policies_per_trial, show_default=True)
@click.option("--ops", type=int, default=_DEFAULTS.ops, show_default=True, help="Ops per sub-policy (fastaa).")
@click.option("--top", type=int, default=_DEFAULTS.top, show_default=True, help="fastaa: N trials kept per round.")
@click.option("--views", type=int, default=_DEFAULTS.views, show_default=True, help="fastaa: V (any-of-V reward).")
@click.option("--startup-trials", type=int, default=_DEFAULTS.startup_trials, show_default=True)
@click.option("--loops", type=int, default=_DEFAULTS.loops, show_default=True, help="aws: PPO updates.")
@click.option("--episodes", type=int, default=_DEFAULTS.episodes, show_default=True, help="aws: pairs per update.")
@click.option("--finetune-epochs", type=int, default=_DEFAULTS.finetune_epochs, show_default=True)
@click.option("--finetune-lr", type=float, default=_DEFAULTS.finetune_lr, show_default=True)
@click.option("--ppo-epochs", type=int, default=_DEFAULTS.ppo_epochs, show_default=True)
@click.option("--ppo-lr", type=float, default=_DEFAULTS.ppo_lr, show_default=True)
@click.option("--clip", type=float, default=_DEFAULTS.clip, show_default=True, help="aws: PPO ratio clip.")
@click.option("--max-kl", type=float, default=_DEFAULTS.max_kl, show_default=True)
@click.option("--entropy-weight", type=float, default=_DEFAULTS.entropy_weight, show_default=True)
@click.option("--baseline-decay", type=float, default=_DEFAULTS.baseline_decay, show_default=True,
              help="aws: moving-average decay of the reward baseline, in [0, 1).")
@click.option("--keep", type=int, default=_DEFAULTS.keep, show_default=True, help="aws: pairs written (0: all).")
@click.option("--splits-subset", help="fastaa: comma-separated splits this process runs (one process per GPU).")
@click.option("--searched-on", help="Dataset name recorded in the policy (default: the detected layout).")
@click.option("--resume", is_flag=True, help="Continue the search in --out (same settings required).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def augment_search_command(data_root, out_dir, method, sampler, model, dataset, normalization, seed, epochs,
                           batch_size, lr, weight_decay, crop_padding, cutout, eval_batch_size, splits, holdout,
                           trials, rounds, policies_per_trial, ops, top, views, startup_trials, loops, episodes,
                           finetune_epochs, finetune_lr, ppo_epochs, ppo_lr, clip, max_kl, entropy_weight,
                           baseline_decay, keep, splits_subset, searched_on, resume, device, no_progress) -> None:
    """Search an augmentation policy on the training split; writes OUT/policy.json (train-stage reads it).

    Several GPUs (fastaa): run one process per split, e.g. `CUDA_VISIBLE_DEVICES=k micronet augment search ...
    --splits-subset k` (same --out for all; the first creates it, the others add --resume and must start only
    after the first has written OUT/settings.json), then once more with --resume and no subset to write the
    policy of all splits. AWS runs in one process on one device.
    """
    settings = SearchSettings(
        method=method, sampler=sampler, model=model, normalization=normalization, seed=seed, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, crop_padding=crop_padding, cutout=cutout,
        eval_batch_size=eval_batch_size, splits=splits, holdout=holdout, trials=trials, rounds=rounds,
        policies_per_trial=policies_per_trial, ops=ops, top=top, views=views, startup_trials=startup_trials,
        loops=loops, episodes=episodes, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
        ppo_epochs=ppo_epochs, ppo_lr=ppo_lr, clip=clip, max_kl=max_kl, entropy_weight=entropy_weight,
        baseline_decay=baseline_decay, keep=keep)
    subset = None
    if splits_subset:
        try:
            subset = [int(x) for x in splits_subset.split(",")]
        except ValueError:
            raise MicronetError(f"--splits-subset expects comma-separated split numbers, got {splits_subset!r}"
                                ) from None
    path = search(data_root, out_dir, settings, dataset=dataset, resume=resume, device=device, splits_subset=subset,
                  searched_on=searched_on, progress=not no_progress)
    click.echo(f"policy written to {path}  (use: --set augment.policy={path})")


@augment_group.command("show")
@click.argument("policy")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the summary as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def augment_show_command(policy: str, plot_path: str | None, as_json: bool) -> None:
    """Summarise a policy file or shipped policy: op counts, share of ops (of all op slots, weighted sub-policies
    by their weights; the shares sum to 100%), probability and level histograms."""
    summary = policy_summary(load_policy(policy))
    if plot_path:
        plot_policy(summary, plot_path)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['name']}: {summary['subpolicies']} sub-policies of {summary['ops_per_subpolicy']} ops, "
               f"{summary['levels']} levels, searched on {summary['searched_on'] or 'unknown'}"
               f"{', weighted' if summary['weighted'] else ''}")
    bins = ["0-.2", ".2-.4", ".4-.6", ".6-.8", ".8-1"]
    rows = [(name, r["count"], f"{100 * r['share']:.1f}%", " ".join(f"{c:>3}" for c in r["probability"]),
             " ".join(f"{c:>3}" for c in r["level"])) for name, r in summary["ops"].items()]
    click.echo(tabulate(rows, headers=["op", "count", "share of ops", f"probability {' '.join(bins)}",
                                       f"level {' '.join(bins)}"]))


if __name__ == "__main__":  # python -m micronet.cli
    main()
