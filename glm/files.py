"""Output files and folders that appear complete or not at all, with the mode the user's umask gives."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_OWNER_FILE = ".writing-pid"  # in a folder being written: the writer's pid (remove_stale_temp_folders)


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def publish_folder(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `folder` to write into. When the block ends, it replaces `folder`
    (an old one is removed), with the mode the umask gives new folders; when the block raises, it is
    removed and `folder` is left as it was. It holds the writer's pid while it exists, so a rerun after a
    kill can remove it (`remove_stale_temp_folders`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / _OWNER_FILE).write_text(str(os.getpid()))
        yield tmp
        (tmp / _OWNER_FILE).unlink()
        tmp.chmod(0o777 & ~umask())  # mkdtemp creates it private
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_folders(folder: Path) -> list[Path]:
    """Remove temporary folders an earlier, killed write of `folder` left beside it (their writing process
    is gone); returns what was removed."""
    removed = []
    for candidate in folder.parent.glob(f".{folder.name}.*"):
        owner = candidate / _OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not ours
        if not _pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder, renamed into place.

    Unlike `tempfile.mkstemp` (always 0600), the file is created as `open()` creates files: mode 0666
    less the umask. The folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
