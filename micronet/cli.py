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

