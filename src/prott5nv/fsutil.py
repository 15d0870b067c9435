"""Atomic outputs: nothing a reader can see is ever half-written. Torch-free, so every layer can use it."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from .errors import OutputError, ProtT5nvError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    kind: str = "file",
    marker: str | None = None,
) -> Path:
    """Refuse, before any compute, an output that must not or cannot be written; every command calls this
    on each of its outputs. Raises :class:`~prott5nv.errors.OutputError` (one line, naming the path) when

    * `path` names no new entry (``.``, ``..``, ``/``);
    * it is one of the `inputs` or a directory holding one (resolved paths: links and ``./`` do not hide it);
    * it is a directory where a file (`kind` "file") is expected, or not a directory where a directory
      (`kind` "dir") is expected -- even with `overwrite`;
    * it exists and `overwrite` is false (an empty directory is no loss: accepted as a directory output);
      with `overwrite`, an existing directory is accepted only when it holds `marker` (a file every
      output of this command has) -- and then only the entries the command writes are replaced, the
      others kept (:func:`replace_path`);
    * no file can be created where it would go (the nearest existing ancestor is not a writable directory:
      a probe file is created there and removed, which also catches read-only file systems and root).

    Missing parent directories are allowed (the writers create them). Returns the path.
    """
    p = Path(path).expanduser()
    what = "file" if kind == "file" else "directory"
    if p.name in ("", ".", ".."):
        raise OutputError(f"output '{path}' is an existing directory, not a new output {what} name")
    target = p.resolve()
    for inp in inputs:
        if inp is None or str(inp) in ("", "-"):
            continue
        source = Path(inp).expanduser().resolve()
        if target == source or target in source.parents:
            held = "is" if target == source else "holds"
            raise OutputError(f"output '{path}' {held} the input '{inp}'; choose another output name")
    if p.exists() or p.is_symlink():
        if kind == "file" and p.is_dir():
            raise OutputError(f"output '{path}' is a directory, expected an output file name")
        if kind != "file" and not p.is_dir():
            raise OutputError(f"output '{path}' exists and is not a directory (this command writes a directory)")
        empty = p.is_dir() and not p.is_symlink() and next(p.iterdir(), None) is None
        if not overwrite and not empty:
            raise OutputError(f"output '{path}' already exists (use --overwrite to replace it)")
        if marker is not None and p.is_dir() and not empty and not (p / marker).exists():
            raise OutputError(
                f"output '{path}' is a directory without {marker}, so not an output of this command; "
                "choose another name"
            )
    where = Path(os.path.abspath(p)).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"output '{path}': {where} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=where)
    except OSError as exc:
        raise OutputError(f"output '{path}': cannot create files in {where} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return p


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, owns: Sequence[str] | None = None) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `path`; on success it replaces `path` (rename), on
    error it is removed. Readers never see a half-written directory. `owns`: the names (glob patterns)
    of the entries the writer makes; the other entries of an existing `path` are kept
    (:func:`replace_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = _umask()
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs are ordinary directories
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        replace_path(tmp, path, owns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_path(src: Path, dst: Path, owns: Sequence[str] | None = None) -> None:
    """Move `src` to `dst`, replacing it. A file replaces in one rename; an existing directory cannot be
    renamed over, so it is moved aside first and removed after `src` took its place.

    `owns` (directories): glob patterns of the top-level entries the writer of `src` makes. Entries of
    the old `dst` matching none of them (a model card, a user's notes) are not the writer's to delete:
    they are carried into `src` first (hard links, copies where links fail), so the new directory
    appears with them in one rename. None: `dst` is replaced whole (it holds only the writer's files).
    """
    if src.is_dir() and dst.is_dir() and not dst.is_symlink() and owns is not None:
        kept = [e for e in sorted(os.listdir(dst))
                if not any(fnmatch.fnmatchcase(e, pat) for pat in owns) and not (src / e).exists()]  # fmt: skip
        for name in kept:
            _link_tree(dst / name, src / name)
        if kept:
            shown = ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else "")
            log.info("%s: kept %s (not written by this command)", dst, shown)
    if src.is_dir() and dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        old.rmdir()
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """Make `dst` the same entry as `src`: files hard-linked (copied where the file system refuses),
    directories rebuilt, links kept as links."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


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
