"""Atomic outputs: nothing a reader can see is ever half-written. Torch-free, so every layer can use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from .errors import ProtT5nvError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `path`; on success it replaces `path` (rename), on
    error it is removed. Readers never see a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = _umask()
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs are ordinary directories
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing it. A file replaces in one rename; an existing directory cannot be
    renamed over, so it is moved aside first and removed after `src` took its place."""
    if src.is_dir() and dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        old.rmdir()
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_text_file(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Write a text file through a hidden temporary beside it, renamed into place only on success."""
    target = Path(path)
    if target.is_dir():
        raise ProtT5nvError(f"{target}: is a directory, expected an output file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with open(tmp, "w", newline="") as fh:
            yield fh
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sync_in_background(paths: Sequence[str | os.PathLike]) -> Callable[[], None]:
    """Start flushing the files `paths` to disk (fsync) in a thread, so that the caller's remaining work
    overlaps the disk writes; returns a function that waits for it and raises its error, if any."""
    errors: list[OSError] = []

    def work() -> None:
        for path in paths:
            try:
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as exc:
                errors.append(exc)

    thread = threading.Thread(target=work, name="fsync", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]

    return wait
