"""Eval datasets read with line numbers, and the evals' run directories (on `k2lab.runs`).

Answers, grades and reviews are appended one JSON line per item as soon as they exist (`k2lab.runs.append_jsonl`),
so an interrupted run loses at most the line being written; readers drop a torn last line. That is what lets
`--resume` skip every item already answered.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from k2lab.data import DatasetError
from k2lab.runs import RunDirError, claim, write_atomic

ON_ERROR = ("skip", "stop")


@dataclass
class Dataset:
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each row left out


def read_dataset(path: str | Path, check: Callable[[dict], None], on_error: str = "stop") -> Dataset:
    """Rows of a .jsonl or .csv file; `check(row)` raises ValueError on a bad row.

    on_error="stop" raises DatasetError at the first bad row; "skip" leaves it out and records why.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file; check --dataset")
    out = Dataset(rows=[])
    for line_no, parse in _raw_rows(path):
        try:
            row = parse()
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            check(row)
        except (ValueError, KeyError, TypeError) as e:
            msg = f"{path}:{line_no}: {e}"
            if on_error == "stop":
                raise DatasetError(msg) from None
            out.skipped.append(msg)
            continue
        out.rows.append(row)
    return out


def _raw_rows(path: Path) -> Iterable[tuple[int, Callable[[], object]]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if None in row:
                extra = row.pop(None)
                yield reader.line_num, lambda extra=extra: _raise(f"{len(extra)} more fields than the header")
            else:
                yield reader.line_num, lambda row=row: row
        return
    if path.suffix != ".jsonl":
        raise DatasetError(f"{path}: dataset must be .jsonl or .csv")
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield i, lambda line=line: _loads(line)


def _loads(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None


def _raise(msg: str):
    raise ValueError(msg)


def require(row: dict, fields: dict[str, type]) -> None:
    """Raise ValueError naming the first missing or mistyped field."""
    for name, typ in fields.items():
        if name not in row or row[name] in (None, ""):
            raise ValueError(f"missing field {name!r}")
        if not isinstance(row[name], typ):
            raise ValueError(f"field {name!r} must be {typ.__name__}, got {type(row[name]).__name__}")


def open_run(run_dir: Path, kind: str, resume: bool, model: str) -> None:
    """Claim run_dir for a new `kind` eval run, or check that a resumed one is the same model's (`k2lab.runs`)."""
    existed = (run_dir / "run.json").exists()
    claim(run_dir, {"model": model}, f"eval-{kind}")  # refuses another kind of run, or another model's
    if existed and not resume:
        raise RunDirError(f"{run_dir} already holds an eval-{kind} run; pass --resume to continue it or use "
                          "another --run-dir")


def snapshot(run_dir: Path, rows: list[dict]) -> None:
    """Keep the rows a run uses in run_dir/dataset.jsonl, so reports and review do not need the original file."""
    write_atomic(run_dir / "dataset.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
