"""Writing a file so that nothing the user had is lost: a temporary file beside the target, checked, then renamed.

One helper for every writer (label maps, DICOM-SEG, run-folder files): a crash, a full disk or a failed check leaves
the previous file as it was and no temporary file behind, and the new file gets the permissions a plain `open` would
give (0666 minus the umask), not `mkstemp`'s owner-only 0600 that a PACS import service could not read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
