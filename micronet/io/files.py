"""The one writer of output files: atomic, no-clobber unless forced, never through links or onto devices.

``atomic_write(path, write, force=...)`` writes to a temp file next to ``path`` and then puts it in place:

* with ``force=False`` by ``os.link`` (fails if ``path`` exists, so the existence check and the rename are one
  atomic step: two writers to one path can never both succeed), with ``force=True`` by ``os.replace``;
* ``path`` must not be a symbolic link (dangling or not), a directory, a device node, a FIFO or a socket: we
  never write through a link nor replace something that is not a regular file, ``force`` or not;
* disk-full, read-only, permission and file-size-limit errors become one-line errors; the old file is intact
  and the temp file is gone.

Temp files are named ``.NAME.PID.RANDOM.tmp``. A writer killed with SIGKILL cannot clean up, so each write
first removes the temp files of earlier writes to the same target whose process is dead and which are older
than this write's start: a target never collects more than the one stale temp of its last crash.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from micronet.errors import MicronetError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large (file-size limit reached)",
}


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0) or exc.strerror or str(exc).splitlines()[0]


def _new_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def stale_temps(path: Path, before: float) -> list[Path]:
    """Temp files of earlier writes to ``path`` whose writer process is dead and that predate ``before``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    stale = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        candidate = path.parent / name
        try:
            info = candidate.lstat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mtime < before:
            stale.append(candidate)
    return stale


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an output path we must not write: missing folder, link, non-regular file, or existing without force."""
    path = Path(path)
    parent = path.parent
    try:
        if not stat.S_ISDIR(parent.stat().st_mode):
            raise MicronetError(f"output directory {parent} is not a directory")
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        if not parent.exists():
            raise MicronetError(f"output directory {parent} does not exist; create it first") from None
        return path
    except OSError as exc:  # e.g. a folder we may not even look into
        raise MicronetError(f"cannot write {path}: {_reason(exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise MicronetError(f"{path} is a symbolic link; micronet does not write through links (name the target "
                            "file itself)")
    if stat.S_ISDIR(info.st_mode):
        raise MicronetError(f"output path {path} is a directory; give a file name")
    if not stat.S_ISREG(info.st_mode):
        raise MicronetError(f"{path} is not a regular file (a device, FIFO or socket); refusing to replace it")
    if not force:
        raise MicronetError(f"{path} already exists; pass --force to overwrite it")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, force: bool = True) -> Path:
    """Call ``write(tmp_path)`` then move the temp file onto ``path`` (see the module docstring). On any failure,
    including one raised by ``write`` after writing (e.g. a failed verification), the old file is untouched
    and no temp file remains."""
    started = time.time()
    path = check_output_path(path, force)
    for old in stale_temps(path, started):
        old.unlink(missing_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise MicronetError(f"cannot write {path}: {_reason(exc)}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes owner-only files; give the usual umask permissions
        check_output_path(path, force)  # a link or device may have appeared meanwhile
        if force:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise MicronetError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _link_no_clobber(tmp: str, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there, atomically (``link`` fails with EEXIST)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise MicronetError(f"{path} already exists (written meanwhile by someone else); pass --force "
                            "to overwrite it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # File systems without hard links (FAT, some FUSE mounts): an O_EXCL placeholder claims the name, then the
        # rename replaces only our own placeholder.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise MicronetError(f"{path} already exists; pass --force to overwrite it") from None
        os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some file systems refuse to open or sync a folder, which is harmless here."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
