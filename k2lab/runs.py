"""A run directory: atomic writes, append-only JSONL logs, and the run's identity checked on resume.

Every long command (pretrain, qat, sft, rl, synth, evals, agents, swarm) keeps its state in one directory and
resumes from it. This module is the only place that writes files atomically or appends records:

- `write_atomic(path, data)` / `write_json(path, obj)`: readers never see half a file (temp file in the same
  directory, fsync, rename).
- `atomic_path(path)`: a context manager yielding a temp path for writers that need a file name (torch.save,
  safetensors, numpy); the file replaces `path` only if the block succeeds.
- `atomic_dir(path)`: the same for a whole directory (checkpoints): built under a temp name, renamed at the end.
- `append_jsonl(path, record)` / `read_jsonl(path)`: one record per line, fsync'd; a torn last line left by a
  killed process is dropped by the reader and cut off by the next append.
- `claim(run_dir, identity, kind)`: the first call writes `run.json`; later calls check that the directory holds
  the same kind of run with the same identity, and refuse a foreign directory with `RunDirError` naming what
  differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class RunDirError(ValueError):
    """A run directory that cannot be used for this run (foreign, other settings, unreadable)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp file path next to `path`; on success it is fsync'd and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes so that readers never see half a file."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_json(path: str | Path, obj, **dumps) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, **dumps) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON file, or RunDirError naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success it replaces `path` (an older one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line, durably; a torn last line left by a killed run is cut off first."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            with open(path, "rb") as f:
                tail = f.read()
            os.ftruncate(fd, tail.rfind(b"\n") + 1)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records of an append log ([] if absent); a torn last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line has no newline: it was being written when the run died
                break
            raise RunDirError(f"{path}:{i + 1}: corrupt record (not JSON); the file was edited or damaged") from None
    return out


def rewrite_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a log atomically (used to drop records that a resumed run will write again)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class _Unset:
    """A setting one of two run identities does not have (a recipe from before the setting existed)."""

    def __repr__(self) -> str:
        return "not set"


_UNSET = _Unset()


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each setting that differs; nested settings (a recipe) are compared
    key by key, so a refusal names the one number that changed rather than printing the whole recipe twice."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def claim(run_dir: str | Path, identity: dict, kind: str, inputs: tuple[str, ...] = (),
          added: dict | None = None) -> Path:
    """Make `run_dir` this run's directory: new -> write run.json; existing -> same kind and identity, or refuse.

    `identity` holds every setting that makes two runs the same run (not run control such as save intervals).
    JSON round-trips it first so tuples and lists compare equal. `inputs`: entries a new run directory may
    already hold because the caller prepared them (pre-training's packed `data` and `tokenizer`). `added`:
    settings introduced after older run directories were written, each with the value that behaves as before;
    a run.json without one reads as having that value, so those runs still resume.
    """
    run_dir = Path(run_dir)
    identity = json.loads(json.dumps(identity))
    path = run_dir / "run.json"
    if path.exists():
        old = read_json(path)
        if not isinstance(old, dict) or old.get("kind", kind) != kind:
            found = old.get("kind") if isinstance(old, dict) else None
            raise RunDirError(f"{run_dir} holds a {found or 'different'} run, not a {kind} run; "
                              f"use another --run-dir")
        old_id = old.get("identity", {k: v for k, v in old.items() if k != "kind"})
        old_id = {**json.loads(json.dumps(added or {})), **old_id}
        diff = _differences(old_id, identity)
        if diff:
            shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:3])
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise RunDirError(f"{run_dir} holds a {kind} run with other settings ({shown}{more}); "
                              f"use another --run-dir or the same settings")
        return run_dir
    if run_dir.exists() and any(p.name not in ("run.json", *inputs) and not p.name.startswith(".")
                                for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir} is not empty and is not a k2lab {kind} run (no run.json); "
                          f"use an empty or new --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {"kind": kind, "identity": identity})
    return run_dir
