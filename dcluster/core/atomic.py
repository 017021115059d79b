"""Files that hold their old content or the complete new one, never a mix.

A preempted job can die between any two system calls, and a reader (a resume, a folder scan,
another rank opening a shard index) must never see half a file. So a file is never written in
place: the bytes go to a hidden temp file in the same directory (a rename is atomic only
within one file system), which is fsynced and renamed over the target, and then the directory
is fsynced so that the rename itself survives a power loss.

Temp files are named ``.<name>.<random>.tmp``: hidden, so that folder scans skip them, and
unique, so that concurrent writers of one file never share one. Where a directory has a
single writer, temp files found in it can only come from a killed writer, and
:func:`remove_stale_temps` removes them.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: without this a power loss can forget the new directory entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Give ``path`` either its old content or the complete new content that ``write`` puts
    into the file object it is handed; the temp file is removed if ``write`` fails.

    The file gets the permissions of any newly created file (0o666 less the umask), not
    mkstemp's 0o600: datasets and runs are shared by a team."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path``, for a file something else writes (a database)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def publish(tmp: Path, path: Path) -> None:
    """Make the complete file ``tmp`` (from :func:`temp_path`) appear as ``path`` at once."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of bytes already in memory."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temps(directory: Path, name: str = "*") -> None:
    """Remove temp files of a killed writer (of file ``name``, or of any): safe only while no
    other writer of them is active."""
    for tmp in Path(directory).glob(f".{name}.*{TMP_SUFFIX}"):
        log.info("removing %s left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)
