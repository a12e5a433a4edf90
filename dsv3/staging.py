"""Directories that appear whole or not at all: build into a hidden sibling, rename into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class NoSpaceError(OSError):
    """What is about to be written does not fit on the target file system (checked before writing anything)."""


def check_free_space(out: str | os.PathLike, nbytes: int, hint: str = "") -> None:
    """Refuse to start writing `nbytes` under `out` when its file system has less free (with 1% + 64 MB to spare):
    a 671B checkpoint would otherwise fill the disk for an hour before failing."""
    probe = Path(out).absolute().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.01) + (64 << 20)
    if need > free:
        raise NoSpaceError(f"{out} needs {nbytes / 1e9:.1f} GB but {probe} has {free / 1e9:.1f} GB free; free space "
                           f"or write elsewhere{hint}")


@contextmanager
def staged_directory(out: str | os.PathLike, *, overwrite: bool = False, needs_bytes: int = 0,
                     space_hint: str = "") -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it replaces `out` (one rename), on any failure it is removed.
    `needs_bytes`: what the caller will write, checked against the free space first (`check_free_space`, whose
    error ends with `space_hint`).

    A killed process leaves only a `.NAME.tmp-*` sibling, never a directory under the final name.
    """
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if needs_bytes:
        check_free_space(out, needs_bytes, space_hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
