"""experiments/knowledge_extraction.py: checkpoint labels, the table with rows measured before a column existed,
and a wrong argument answered in one line (no model runs here; the findings are in the README)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import knowledge_extraction as ke  # noqa: E402


def test_a_checkpoint_may_carry_a_label():
    assert ke.parse_checkpoint("runs/a/step-1") == (None, Path("runs/a/step-1"))
    assert ke.parse_checkpoint("the QA base, lr 3e-4=runs/b") == ("the QA base, lr 3e-4", Path("runs/b"))
    assert ke.parse_checkpoint(" =runs/c") == (None, Path("runs/c"))


def test_rows_from_before_a_column_existed_say_not_measured():
    counts = {"hits": 3, "items": 48}
    new = {"checkpoint": "/x", "label": "new run", **{c: counts for c, _ in ke.COLUMNS}}
    old = {"checkpoint": "/tmp/gone", **{c: counts for c, _ in ke.COLUMNS if "declined" not in c}}
    text = ke.report([new, old])
    new_line, old_line = (line for line in text.splitlines() if line.startswith("| new run") or
                          line.startswith("| /tmp/gone"))
    assert new_line.count("3/48") == len(ke.COLUMNS) and "not measured" not in new_line
    assert old_line.count("not measured") == 2 and old_line.count("3/48") == len(ke.COLUMNS) - 2


def test_a_directory_that_is_no_checkpoint_gets_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "knowledge_extraction.py"), f"mine={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"{tmp_path}: not a checkpoint with its tokenizer (needs config.json and tiktoken.model)"
