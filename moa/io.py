"""Atomic writes: a reader never sees a half-written file or folder, and a crash loses nothing old.

Every safetensors file moa writes goes through `write_safetensors`, so that the same tensors and
metadata always give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from moa.errors import MoaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; on success it is renamed onto `path` (os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (on the CPU, contiguous) and `metadata` atomically as a canonical safetensors file.

    safetensors (0.8) writes the metadata from a hash map, in an order that changes from process to
    process; the JSON header is rewritten in place with the metadata keys sorted. The same strings in
    another order and serde_json's escaping (which Python's json shares) keep the header's length, so
    the data behind it, whose offsets count from the header's end, stays where it is. `format: pt` is
    what transformers requires of a model file (and what PEFT writes into adapters).
    """
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
        with tmp.open("r+b") as f:
            size = int.from_bytes(f.read(8), "little")  # the format: u64 little-endian header size, then the header
            header = json.loads(f.read(size))
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            assert len(canonical) <= size, f"{path}: the canonical safetensors header would overwrite the data"
            f.seek(8)
            f.write(canonical.ljust(size))  # padded with spaces, as safetensors pads to 8-byte alignment
    return path


def read_json(path: Path, fix: str) -> Any:
    """Parse a JSON file; a missing or malformed one is a MoaError naming it and saying `fix`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoaError(f"{path}: not found; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoaError(f"{path}: not valid JSON ({err}); {fix}") from None
