"""Outputs that exist only complete: written under a temporary name in the same folder, then
renamed over the final name (atomic on POSIX), so a crash, a kill or an error never leaves a
half-written report, table, prediction or metadata file behind."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def path(final: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `final`, with its name's extensions kept (nibabel and
    matplotlib choose the format by them); renames it to `final` if the block succeeds and
    removes it otherwise."""
    final = pathlib.Path(final)
    # Host and pid: processes of one run on several machines share a file system.
    tmp = final.with_name(f".tmp.{socket.gethostname()}.{os.getpid()}.{final.name}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_text(final: str | pathlib.Path, newline: str | None = None) -> Iterator[Any]:
    """A text file opened for writing that appears at `final` only when the block succeeds."""
    with path(final) as tmp, tmp.open("w", newline=newline) as f:
        yield f


def write_text(final: str | pathlib.Path, text: str) -> pathlib.Path:
    with path(final) as tmp:
        tmp.write_text(text)
    return pathlib.Path(final)


def write_json(final: str | pathlib.Path, obj: Any, **kwargs) -> pathlib.Path:
    return write_text(final, json.dumps(obj, indent=1, **kwargs))
