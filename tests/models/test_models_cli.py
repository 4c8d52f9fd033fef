"""`micronet models`: the zoo table and its JSON form."""

import json

from click.testing import CliRunner

from micronet.cli import main

EXPECTED_PARAMS = {
    "densenet100_k12": 800_032,
    "densenet172_k30": 12_232_300,
    "pyramidnet272_a200": 26_288_692,
    "pyramidskipnet272_a200": 26_642_613,
    "shakeshake26_2x32d": 2_934_772,  # 100 classes; tests/models/test_shakeshake.py has the 10-class counts
    "shakeshake26_2x96d": 26_227_572,
    "shakeshake26_2x112d": 35_680_852,
    "wrn28_10": 36_536_884,
}


def test_models_table():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "params", "dense"]
    for name, params in EXPECTED_PARAMS.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{params:,}" in row
    assert "287,960,472" in result.output


def test_models_json():
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {row["name"]: row["params"] for row in rows} == EXPECTED_PARAMS
    assert all(isinstance(row["macs"], int) and row["macs"] > 0 for row in rows)


def test_models_help():
    result = CliRunner().invoke(main, ["models", "--help"])
    assert result.exit_code == 0 and "--json" in result.output
