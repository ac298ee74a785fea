"""Files replaced in one rename: a reader never sees half a file, and a failed write is one line.

Every file a run directory holds (``checkpoints/last.pt``, ``summary.json``,
``metrics.jsonl``, ``run.json``) is written to a temporary file beside it
(``.<name>.<random>.xgrad-tmp``: a name of the suite's own), flushed to the disk
and renamed over the old one (``os.replace`` is atomic on POSIX), so a process
killed at any moment leaves either the previous complete file or the new one.

A write that fails (a full disk, a folder that is not writable) removes its
temporary file and raises :class:`WriteFailed`, whose message names the path;
the previous file is untouched. That holds whatever the writer raises: torch
reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]``
with the ``OSError`` only in its context, which is where the reason is read.
A temporary file that a killed process could not remove is left for
:func:`remove_temporaries`, which a run calls on its directory once it holds the
directory's lock (xgrad/run_dir.py): only then can no other process be in the
middle of writing one. It removes only files named as this module names them:
a user's ``notes.tmp`` is never touched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

#: the end of every temporary file's name (and only theirs): what remove_temporaries deletes
SUFFIX = ".xgrad-tmp"


class WriteFailed(Exception):
    """A file of the run could not be written; the message names it and says why, in one line."""

    def __init__(self, path: Path, error: OSError | str):
        why = error if isinstance(error, str) else error.strerror or str(error)
        super().__init__(f"cannot write {path}: {why} (the previous version of the file, if any, is intact)")
        self.path, self.errno = path, getattr(error, "errno", None)


def replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, in one rename after an fsync."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=SUFFIX, dir=path.parent)
    except OSError as error:
        raise WriteFailed(path, error) from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes private files; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _io_error(error)
        if cause is not None:
            raise WriteFailed(path, cause) from None
        raise


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8)."""
    replace(path, lambda f: f.write(text.encode("utf-8")))


def _io_error(error: BaseException) -> OSError | str | None:
    """The input/output failure behind ``error``, if it is one: an OSError, or one in its cause or context.

    A writer may wrap the OSError in its own exception (torch's zip writer
    raises a RuntimeError about the stream position, the OSError its context);
    where it keeps none, a torch stream-writer error is still a failed write.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return text.strip().splitlines()[0] if text.strip() else "the checkpoint writer failed"
    return None


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that writes into ``folder`` left behind (killed mid-write); return them."""
    removed = []
    for path in sorted(folder.glob(f".*.*{SUFFIX}")) if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
