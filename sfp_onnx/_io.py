"""Atomic file output: write to a temporary file beside the target, then rename.

A reader (or a user after Ctrl-C or a full disk) sees either the old file or the complete new
one, never a half-written file. ONNX models with external data are written as a pair: the data
file is renamed into place first, then the model file that points to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sfp_onnx.errors import OutputError

__all__ = ["atomic_path", "check_writable", "write_json", "write_text"]


def check_writable(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Fail early, before any long work, if ``path`` cannot be written or would clobber an input."""
    out = Path(path)
    for src in inputs:
        if Path(src).exists() and out.exists() and os.path.samefile(out, src):
            raise OutputError(f"output {out} is the input model; choose another path")
        if Path(src).resolve() == out.resolve():
            raise OutputError(f"output {out} is the input model; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    On any exception the temporary file is removed and the target is left untouched.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent or "."
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"no space left on device while writing {target}") from exc
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
