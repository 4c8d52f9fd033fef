"""``make gpu-check`` in CPU mode: every section reports, the CPU-valid checks pass, skips say why (issue 17).

Runs the real script as a user would (its own process, ``--cpu``), with the tiny model for section d so that
the whole run stays around half a minute on a 2-core machine. Timings are not checked, only the logic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["a_environment", "b_correctness", "c_pipeline", "d_throughput", "e_augmentation", "f_ddp", "g_export"]


def test_gpu_check_cpu_mode_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
           "--model", "densenet_bc:depth=10,growth=4", "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert results["mode"] == "cpu" and list(sections) == SECTIONS
    assert sections["a_environment"]["torch"] and sections["a_environment"]["mode"] == "cpu"
    checks = sections["b_correctness"]["checks"]
    assert set(checks) == {"fake_quant", "round_clamp", "masks", "deploy_form", "score"}
    assert all(c["passed"] for c in checks.values())
    pipeline = sections["c_pipeline"]
    assert pipeline["status"] == "passed" and pipeline["run_all_eager"]["complete"]
    assert len(pipeline["run_all_eager"]["stages"]) == 8  # train-stage all: every stage ran
    assert {v["status"] for v in pipeline["sync_check_eager"].values()} == {"skipped"}
    assert all("needs a GPU" in v["why"] for v in pipeline["sync_check_eager"].values())
    assert pipeline["compiled"]["status"] == "skipped" and "CPU mode" in pipeline["compiled"]["why"]
    rates = sections["d_throughput"]["eager"]["img_per_s"]
    assert set(rates) == {"float", "masked", "fake-quant"}
    assert all(v > 0 for kind in rates.values() for v in kind.values())
    assert "fake_quant_over_float_step_time" in sections["d_throughput"]["eager"]
    assert len(sections["e_augmentation"]["img_per_s"]) == 5
    ddp = sections["f_ddp"]["runs"]["nproc=1"]
    assert ddp["passed"] and ddp["ranks"][0]["killed"] and ddp["ranks"][0]["resumed_identical"]
    assert sections["g_export"]["status"] == "skipped" and sections["g_export"]["why"]
    assert "not" in results["targets"]["note"] or "CPU mode" in results["targets"]["note"]
    assert "b_correctness" in done.stdout and "results:" in done.stdout  # the readable table


def test_a_failing_section_is_reported_not_raised(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    s = gpu_check.Settings(cuda=False, budget=60, start=0.0, work=Path("."), model="x", batch=1, steps=1, warmup=1)
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: 1.0)

    def broken(settings):
        raise ValueError("boom")

    def missing(settings):
        raise ImportError("No module named 'onnxruntime'")

    assert gpu_check._run_section("x", broken, s, 0)["status"] == "failed"
    skipped = gpu_check._run_section("x", missing, s, 0)
    assert skipped["status"] == "skipped" and "onnxruntime" in skipped["why"]
    assert gpu_check._run_section("x", broken, s, 120)["why"].startswith("time budget")
