"""Writing a file so that nothing the user had is lost: a temporary file beside the target, checked, then renamed.

One helper for every writer (label maps, DICOM-SEG, run-folder files): a crash, a full disk or a failed check leaves
the previous file as it was and no temporary file behind, and the new file gets the permissions a plain `open` would
give (0666 minus the umask), not `mkstemp`'s owner-only 0600 that a PACS import service could not read. Also what
a path on the reading side can be that a plain `is_file()` would hide: a broken symbolic link.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from segment.errors import InputError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replaced_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block finishes, it replaces `path` in one rename.

    Raise inside the block (e.g. when a read-back check fails) and `path` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def broken_link(path: Path) -> str | None:
    """The problem with `path` when it is a symbolic link to nothing (a moved or unmounted scan), else None."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"{path}: broken link to {os.readlink(path)} (no such file)"
    return None


def check_output(path: Path, overwrite: bool, inputs: tuple[Path, ...], is_ours: Callable[[Path], bool]) -> Path:
    """Refuse an output before any compute: one of the case's inputs, a file segment did not write (`is_ours` says which
    are ours: never replaced, even with --overwrite), an earlier output without --overwrite, an unwritable folder."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == Path(p).resolve() for p in inputs):
        raise InputError(f"{path}: this is an input of the same case; refusing to write over it")
    if path.exists():
        if not is_ours(path):
            raise InputError(f"{path}: exists and was not written by segment (e.g. a ground-truth label); it is never "
                             "replaced, even with --overwrite; choose another -o")
        if not overwrite:
            raise InputError(f"{path}: file exists; pass --overwrite to replace it")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir():
        raise InputError(f"{folder}: cannot create output folder for {path.name} (it is a file, not a writable folder)")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: cannot write there ({folder} is not a writable folder)")
    return path
