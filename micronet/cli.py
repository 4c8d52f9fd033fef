"""The `micronet` command line: thin shells over the library functions."""

from __future__ import annotations

import sys

import click

from micronet import __version__
from micronet.errors import MicronetError


class _Group(click.Group):
    """Click group that turns MicronetError (and unreadable-file OSErrors) into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MicronetError as exc:
            click.echo(f"error: {exc}", err=True)
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
    import json

    from tabulate import tabulate

    from micronet.models import describe_models, list_families

    rows = describe_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [(row["name"], row["family"], row["params"], row["macs"], row["summary"]) for row in rows]
    click.echo(tabulate(table, headers=["name", "family", "params", "dense MACs", "description"], intfmt=","))
    click.echo("Also accepted: FAMILY:key=value,... e.g. densenet_bc:depth=40,growth=12 "
               f"(families: {', '.join(list_families())}).")
