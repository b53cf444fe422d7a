"""Stands in for the `filelock` package the llama.cpp suite's conftest imports (its
lock serialises model downloads across workers; this run is serial and downloads
nothing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def FileLock(path: str) -> Iterator[None]:
    yield
