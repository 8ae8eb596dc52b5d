"""The embedded corpus: the Python standard library source of the running interpreter.

Every machine that runs k2lab has it, so tokenizer training and small-scale pre-training need no download.
Test suites and site-packages are left out (tests hold deliberately odd text; site-packages differs
between machines). Files come in sorted relative-path order so every run sees the same bytes.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files() -> list[Path]:
    """The corpus files, in a deterministic order (sorted by path relative to the stdlib root)."""
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no Python source files under the standard library at {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_texts(paths: list[Path] | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """Yield file contents (UTF-8, undecodable bytes replaced) until `max_bytes` bytes have been read.

    `paths` None means the embedded corpus. The last file is cut so the total is at most `max_bytes`.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    budget = max_bytes
    for path in corpus_files() if paths is None else [Path(p) for p in paths]:
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        data = path.read_bytes()
        if budget is not None:
            data = data[:budget]
            budget -= len(data)
        yield data.decode("utf-8", errors="replace")
        if budget == 0:
            return


def read_corpus(max_bytes: int | None = None) -> str:
    """The embedded corpus as one string (files joined in order), at most `max_bytes` bytes read."""
    return "".join(iter_texts(max_bytes=max_bytes))
