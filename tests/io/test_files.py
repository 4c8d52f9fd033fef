"""Output paths (issue 12, items 3, 4 and 6): atomic, no-clobber unless forced, never through links or onto
devices; clean one-line errors for full disks, size limits and unwritable folders; a killed writer leaves at
most one stale temp file, which the next write to the same target removes."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from micronet import io, models
from micronet.cli import main
from micronet.errors import MicronetError
from micronet.io.files import stale_temps

ROOT = Path(__file__).resolve().parents[2]
SPEC = "densenet_bc:depth=10,growth=4"


def _write(text: str):
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    return write


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_no_clobber_without_force_and_replace_with_it(tmp_path):
    target = tmp_path / "out.csv"
    io.atomic_write(target, _write("one"), force=False)
    with pytest.raises(MicronetError, match="already exists.*--force"):
        io.atomic_write(target, _write("two"), force=False)
    assert target.read_text() == "one"
    io.atomic_write(target, _write("three"), force=True)
    assert target.read_text() == "three" and _temps(tmp_path) == []


def test_the_existence_check_and_the_rename_are_one_step(tmp_path):
    """A second writer that creates the file after our check but before our rename wins; we fail cleanly."""
    target = tmp_path / "model.onnx"

    def racing_write(tmp: str) -> None:
        Path(tmp).write_text("ours")
        target.write_text("theirs")  # another process finished first

    with pytest.raises(MicronetError, match="already exists"):
        io.atomic_write(target, racing_write, force=False)
    assert target.read_text() == "theirs" and _temps(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_links_fifos_and_devices_are_never_written(tmp_path, force):
    real = tmp_path / "real.txt"
    real.write_text("keep")
    (tmp_path / "link.txt").symlink_to(real)
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(tmp_path / "fifo")
    for name, match in (("link.txt", "symbolic link"), ("dangling.txt", "symbolic link"),
                        ("fifo", "not a regular file")):
        with pytest.raises(MicronetError, match=match):
            io.atomic_write(tmp_path / name, _write("x"), force=force)
    with pytest.raises(MicronetError, match="not a regular file"):
        io.atomic_write("/dev/null", _write("x"), force=force)  # refused before anything is created in /dev
    assert real.read_text() == "keep" and not (tmp_path / "nowhere.txt").exists()
    assert Path("/dev/null").is_char_device() and _temps(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_write_errors_are_one_line_and_keep_the_old_file(tmp_path, code, words):
    target = tmp_path / "rows.csv"
    target.write_text("old")

    def failing(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(MicronetError, match=words) as info:
        io.atomic_write(target, failing, force=True)
    assert "\n" not in str(info.value) and target.read_text() == "old" and _temps(tmp_path) == []


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "m.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.safetensors.{dead_pid}.abc123.tmp"
    live = tmp_path / f".m.safetensors.{os.getppid()}.def456.tmp"  # a live process may still be writing it
    other = tmp_path / f".other.safetensors.{dead_pid}.ghi789.tmp"  # another target's temp: not ours to judge
    for p in (stale, live, other):
        p.write_text("junk")
        os.utime(p, (time.time() - 60, time.time() - 60))
    assert stale_temps(target, time.time()) == [stale]
    io.atomic_write(target, _write("new"))
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "new"


def test_score_csv_and_plot_are_atomic_and_need_force(tmp_path):
    csv, png = tmp_path / "rows.csv", tmp_path / "bars.png"
    args = ["score", "--model", SPEC, "--csv", str(csv), "--plot", str(png)]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = csv.read_bytes()
    assert first.startswith(b"name,") and png.read_bytes()[:4] == b"\x89PNG"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0 and csv.read_bytes() == first
    (tmp_path / "link.csv").symlink_to(csv)
    linked = CliRunner().invoke(main, ["score", "--model", SPEC, "--csv", str(tmp_path / "link.csv"), "--force"])
    assert linked.exit_code == 2 and "symbolic link" in linked.output and csv.read_bytes() == first
    assert _temps(tmp_path) == []


def _child(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


def test_file_size_limit_gives_a_clean_error_and_no_partial_file(tmp_path):
    done = _child(f"""
        import resource, sys
        from micronet import io, models
        from micronet.errors import MicronetError
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the checkpoint needs ~30 KB
        try:
            io.save({str(tmp_path / 'm.safetensors')!r}, models.create({SPEC!r}))
        except MicronetError as exc:
            print("error:", exc); sys.exit(2)
    """)
    assert done.returncode == 2 and "file too large" in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_gives_a_clean_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    old = io.save(folder / "m.safetensors", models.create(SPEC)).read_bytes()
    folder.chmod(0o555)
    # Root ignores folder permissions: drop to "nobody" in the child when we are root.
    drop = "os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
    try:
        done = _child(f"""
            import os, sys
            from micronet import io, models
            from micronet.errors import MicronetError
            model = models.create({SPEC!r})
            {drop}  # after the imports: the interpreter's own files may be root's only
            try:
                io.save({str(folder / 'm.safetensors')!r}, model)
            except MicronetError as exc:
                print("error:", exc); sys.exit(2)
        """)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2 and "permission denied" in done.stdout, done.stdout + done.stderr
    assert (folder / "m.safetensors").read_bytes() == old and _temps(folder) == []


KILLER = """
import os, sys
import torch
torch.set_num_threads(1)
from micronet import io, models
model = models.create("densenet100_k12")  # 3.2 MB per save: long enough to be killed mid-write
print("ready", flush=True)
i = 0
while True:
    io.save(sys.argv[1], model, metrics={"i": i})
    i += 1
"""


def test_sigkill_during_save_leaves_the_old_file_and_at_most_one_stale_temp(tmp_path):
    rng = random.Random(12)
    target = tmp_path / "m.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    saved_before = 0
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", KILLER, str(target)], stdout=subprocess.PIPE, env=env,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        temps = _temps(tmp_path)
        assert len(temps) <= 1, temps  # each new write removed the temps of the writers killed before it
        if target.exists():
            assert isinstance(io.load(target).metrics["i"], int)  # complete and hash-checked, never partial
            saved_before += 1
    io.save(target, models.create(SPEC))  # the next write removes the stale temp
    assert _temps(tmp_path) == [] and io.load(target).model.micronet_spec["name"] == SPEC
    assert saved_before > 0
