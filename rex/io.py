"""Files written atomically, and file digests: the one place the project writes a file that others may read.

Every writer goes through :func:`atomic_write`: the content goes to a uniquely named temporary file in the
target's folder (``.<name>.<random>.tmp``; the same file system, so the rename is atomic), is flushed and
fsynced, and is renamed onto the target with ``os.replace``. A reader (another job, Snakemake, a cache lookup)
sees the old file or the whole new one, never a torn one; a write that fails removes its temporary file.

Standard library only (torch is imported inside :func:`atomic_torch_save` alone), so the workflow's torch-free
modules (``rex.pipeline.aggregate``, ``report``, ``tracking``) use it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_copy", "sha256_file"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any], *, mode: int = 0o644) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once ``write`` returned; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; results and caches are shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, end: str = "\n", **dumps_kw: Any) -> Path:
    """``json.dumps(obj, **dumps_kw) + end`` written atomically (``end=""``: no final newline)."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kw) + end)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch  # here, not at the top: the rest of this module serves torch-free code

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy the bytes of ``src`` onto ``dst`` atomically."""
    with open(src, "rb") as fin:
        return atomic_write(dst, lambda f: shutil.copyfileobj(fin, f, 1 << 20))


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
