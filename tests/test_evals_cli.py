"""`k2lab eval ...` and the endpoint defaults from K2LAB_* variables, against a scripted OpenAI-compatible
server (a real HTTP server on loopback playing back answers and grades; a test double for the models)."""

import json

from typer.testing import CliRunner

from tests.evals_helpers import CalibrationScript, rows_for, write_jsonl
from k2lab.cli import app
from k2lab.evals import toolcall
from k2lab.testing.scripted_server import ScriptedServer


def test_eval_calibration_cli_uses_k2lab_env(tmp_path, monkeypatch):
    letters = {"q1": "A", "q2": "B", "q3": "D"}
    dataset = write_jsonl(tmp_path / "d.jsonl", rows_for(letters))
    script = CalibrationScript({"judge-x": {q: f"ok\n{g}" for q, g in letters.items()}})
    with ScriptedServer(script) as srv:
        monkeypatch.setenv("K2LAB_BASE_URL", srv.base_url)
        monkeypatch.setenv("K2LAB_API_KEY", "test")
        monkeypatch.setenv("K2LAB_MODEL", "answerer")
        args = ["eval", "calibration", "--dataset", str(dataset), "--judge-model", "judge-x",
                "--run-dir", str(tmp_path / "run")]
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        again = CliRunner().invoke(app, args)  # the same run dir without --resume is refused
        assert again.exit_code == 1 and "--resume" in again.output and again.exception.code == 1
        assert CliRunner().invoke(app, args + ["--resume"]).exit_code == 0
    assert sum(script.asked.values()) == 3  # --resume asked nothing again
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["model"] == "answerer" and r["judges"] == ["judge-x"]
    assert r["overall"]["omniscience_index"] == 0.0 and "Omniscience Index 0.0" in out.output


def test_eval_calibration_names_every_wrong_option_at_once(tmp_path):
    """A missing dataset and no judge are both named in one short message, not one per attempt."""
    out = CliRunner().invoke(app, ["eval", "calibration", "--dataset", str(tmp_path / "nosuch.jsonl")])
    assert out.exit_code == 2 and "Traceback" not in out.output
    said = " ".join(out.output.split())
    assert "nosuch.jsonl: no such file" in said and "give at least one --judge-model" in said
    out = CliRunner().invoke(app, ["eval", "calibration", "--dataset", str(tmp_path / "nosuch.jsonl"),
                                   "--grader", "rules", "--run-dir", str(tmp_path / "run")])
    assert out.exit_code == 2 and "no such file" in out.output and "judge" not in out.output
    assert not (tmp_path / "run").exists()


def test_eval_toolcalls_cli_on_the_shipped_set(tmp_path, monkeypatch):
    rows = toolcall.load_dataset(toolcall.SEED_DATASET).rows

    def never_calls(req):  # a model that never calls a tool: recall 0, no schema checks
        return {"content": "no tools today"}

    with ScriptedServer(never_calls) as srv:
        monkeypatch.setenv("K2LAB_API_KEY", "test")
        out = CliRunner().invoke(app, ["eval", "toolcalls", "--base-url", srv.base_url, "--model", "m",
                                       "--run-dir", str(tmp_path / "run")])
        assert out.exit_code == 0, out.output
        assert srv.stats.requests == len(rows)
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    expected_tool = sum(row["expect"] == "tool_calls" for row in rows)
    assert r["finish_reason"]["fn"] == expected_tool and r["finish_reason"]["tn"] == len(rows) - expected_tool
    assert r["finish_reason"]["recall"] == 0.0 and r["schema_accuracy"] is None


def test_eval_coding_cli(tmp_path, monkeypatch):
    from k2lab.evals import coding

    row = next(r for r in coding.load_dataset(coding.SEED_DATASET).rows if r["id"] == "run-length")
    dataset = write_jsonl(tmp_path / "p.jsonl", [row])
    replies = iter([f"```python\n{row['solution']}\n```", "```python\ndef rle(s):\n    return []\n```"])
    with ScriptedServer(lambda req: {"content": next(replies)}) as srv:
        monkeypatch.setenv("K2LAB_API_KEY", "test")
        out = CliRunner().invoke(app, ["eval", "coding", "--dataset", str(dataset), "--base-url", srv.base_url,
                                       "--model", "m", "--n", "2", "--k", "1", "--k", "2", "--concurrency", "1",
                                       "--run-dir", str(tmp_path / "run")])
        assert out.exit_code == 0, out.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["per_problem"][0]["c"] == 1 and r["pass_at_k"] == {"1": 0.5, "2": 1.0}
