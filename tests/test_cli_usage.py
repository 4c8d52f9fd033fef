"""Click's usage errors come out in micronet's one-line style (``error: ...``, exit 2); ``--help`` is unchanged."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from micronet.cli import main


@pytest.mark.parametrize(("args", "message"), [
    (["score", "--bogus"], "No such option '--bogus'"),
    (["train-stage", "student"], "Missing option '--recipe'"),
    (["train-stage", "nosuchstage", "-r", "x", "--data-root", "."], "Invalid value for '{"),
    (["score", "--samples", "zero"], "'zero' is not a valid integer"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["runs", "show"], "Missing argument 'RUN_DIR'"),
])
def test_usage_errors_are_one_line_with_exit_2(args, message):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert message in r.output and "--help'" in r.output


def test_help_is_still_click_help():
    for args in (["--help"], ["score", "--help"], ["runs", "show", "-h"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and r.output.startswith("Usage: "), r.output


def test_runs_show_on_a_folder_without_checkpoints_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["runs", "show", str(tmp_path)])
    assert r.exit_code == 2 and r.output == f"error: {tmp_path} holds no stage checkpoints (*.safetensors)\n"


def test_export_refuses_an_output_name_that_is_not_onnx(tmp_path):
    r = CliRunner().invoke(main, ["export", str(tmp_path / "absent.safetensors"), "-o", str(tmp_path / "model.pt")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "should end in .onnx" in r.output, r.output
    assert "--force-extension" in r.output and not (tmp_path / "model.pt").exists()
