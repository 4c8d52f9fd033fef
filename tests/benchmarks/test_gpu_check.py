"""``make gpu-check`` in CPU mode: every section reports, the CPU-valid checks pass, skips say why (issue 17).

Runs the real script as a user would (its own process, ``--cpu``; CPU mode measures the tiny model in section d),
so the whole run stays around half a minute on a 2-core machine. Timings are not checked, only the logic. A second
run hides the packages a bare GPU machine lacks (pyyaml, safetensors, tabulate, tqdm, click) from the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["a_environment", "b_correctness", "c_pipeline", "d_throughput", "e_augmentation", "f_ddp", "g_export"]


def test_gpu_check_cpu_mode_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
           "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert results["mode"] == "cpu" and list(sections) == SECTIONS and results["complete"] is True
    assert sections["a_environment"]["torch"] and sections["a_environment"]["mode"] == "cpu"
    checks = sections["b_correctness"]["checks"]
    assert set(checks) == {"fake_quant", "round_clamp", "masks", "deploy_form", "score"}
    assert all(c["passed"] for c in checks.values())
    pipeline = sections["c_pipeline"]
    assert pipeline["status"] == "passed" and pipeline["run_all_eager"]["complete"]
    assert len(pipeline["run_all_eager"]["stages"]) == 8  # train-stage all: every stage ran
    assert pipeline["sync_check_eager"]["status"] == "skipped" and "needs a GPU" in pipeline["sync_check_eager"]["why"]
    assert pipeline["compiled"]["status"] == "skipped" and "CPU mode" in pipeline["compiled"]["why"]
    throughput = sections["d_throughput"]["eager"]
    rates = throughput["img_per_s"]
    assert set(rates) == {"float", "masked", "fake-quant"} and throughput["model"] == "densenet_bc:depth=10,growth=4"
    assert all(kind[label] > 0 for kind in rates.values() for label in ("real_augmentation", "synthetic"))
    # The target's ratio comes from the synthetic rows (the model's step alone); the augmented one is reported too.
    for label in ("synthetic", "real_augmentation"):
        ratio = throughput[f"fake_quant_over_float_step_time_{label}"]
        assert ratio == round(rates["float"][label] / rates["fake-quant"][label], 3)
    assert len(sections["e_augmentation"]["img_per_s"]) == 5
    runs = sections["f_ddp"]["runs"]
    assert set(runs) == {"nproc=1", "nproc=2"}
    for n, run in ((1, runs["nproc=1"]), (2, runs["nproc=2"])):
        assert run["passed"] and len(run["ranks"]) == n
        # A process group even for one process (forced), so DDP's all-reduce runs; resumed weights bit-identical.
        assert all(r["backend"] == "gloo" and r["world_size"] == n for r in run["ranks"])
        assert all(r["killed"] and r["resumed_identical"] for r in run["ranks"])
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
    timed_out = gpu_check._run_section("x", broken, s, 120)
    assert timed_out["why"].startswith("time budget") and timed_out["incomplete"] is True
    assert gpu_check.incomplete_parts({"x": timed_out, "y": {"status": "passed"}}) == ["x"]


HIDE = ("yaml", "safetensors", "tabulate", "tqdm", "click")


def test_missing_packages_skip_only_what_needs_them(tmp_path):
    # A bare GPU machine: torch, torchvision, onnx, onnxruntime only. The script still starts, says what is missing,
    # skips the sections that need it by name and runs the rest (here: the throughput section, the real loop).
    out = tmp_path / "check.json"
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in HIDE)
    argv = [str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--sections", "acdf", "--out", str(out),
            "--work", str(tmp_path / "work")]
    code = (f"import runpy, sys; {hide}; sys.argv = {argv!r}; "
            f"runpy.run_path({argv[0]!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["a_environment", "c_pipeline", "d_throughput", "f_ddp"]
    env_section = sections["a_environment"]
    assert set(env_section["missing_packages"]) == {"pyyaml", "safetensors", "tabulate", "tqdm", "click"}
    assert env_section["packages"]["safetensors"] is None and "safetensors missing" in env_section["why"]
    for key in ("c_pipeline", "f_ddp"):  # they write checkpoints
        assert sections[key]["status"] == "skipped"
        assert sections[key]["why"].startswith("missing package safetensors"), sections[key]["why"]
    assert sections["c_pipeline"]["compiled"]["status"] == "skipped"
    assert sections["d_throughput"]["status"] == "measured"
    assert all(v["synthetic"] > 0 for v in sections["d_throughput"]["eager"]["img_per_s"].values())
    assert "c_pipeline" in done.stdout and "missing package safetensors" in done.stdout


def test_a_time_box_kills_the_whole_process_group(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    code, _ = gpu_check.run_boxed([sys.executable, "-c", child], 3.0, tmp_path / "log", dict(os.environ))
    assert code is None
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the grandchild survived its parent's time box")


def test_a_timed_out_child_keeps_its_partial_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    s = gpu_check.Settings(cuda=True, budget=600, start=time.perf_counter(), work=tmp_path, model="m", batch=1,
                           steps=1, warmup=1)

    def timed_out(cmd, timeout, log, env):
        out = Path(cmd[cmd.index("--part-out") + 1])
        gpu_check.write_json(out, {"status": "incomplete", "img_per_s": {"float": {"real_augmentation": 123.0}}})
        return None, "compiling..."

    monkeypatch.setattr(gpu_check, "run_boxed", timed_out)
    result = gpu_check._boxed("compiled_throughput", s, 100)
    assert result["status"] == "incomplete" and result["incomplete"] is True and "kept" in result["why"]
    assert result["img_per_s"]["float"]["real_augmentation"] == 123.0


def test_augment_ops_check_compares_every_op(monkeypatch):
    # On a GPU it compares CUDA with the CPU; here the CPU with itself: every op is listed and passes its rule.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    import torch

    checks = gpu_check.augment_ops_check(torch.device("cpu"))
    ops = {k.removeprefix("op ") for k in checks if k.startswith("op ")}
    assert len(ops) == 15 and {"Rotate", "Sharpness", "Cutout", "Equalize"} <= ops
    assert all(v["passed"] and v["identical"] for v in checks.values())
    assert checks["op Contrast"]["rule"] == "within 1 level" and checks["op Rotate"]["rule"] == "bit-identical"


def test_checked_run_reports_the_first_sync_then_lists_the_rest():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import warnings

    import gpu_check

    modes = []

    def run(mode):
        modes.append(mode)
        if mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        return "done"

    value, syncs = gpu_check.checked_run(run, cuda=True)
    assert value == "done" and modes == ["error", "warn"]
    assert syncs["status"] == "failed" and syncs["syncs"] == 3 and syncs["first"]["where"]
    value, syncs = gpu_check.checked_run(lambda mode: mode, cuda=True)
    assert value == "error" and syncs == {"status": "passed", "mode": "error", "syncs": 0}
    value, syncs = gpu_check.checked_run(lambda mode: mode, cuda=False)
    assert value is None and syncs["status"] == "skipped"
