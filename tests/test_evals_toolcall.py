"""Tool-call eval against a scripted OpenAI-compatible server.

The server (k2lab.testing.scripted_server) is a real HTTP server on loopback that plays back scripted tool
calls: a test double for the model. Under test: sending, retries, resume, schema validation and the metrics,
which must equal the hand-computed values.
"""

import json

import pytest

from tests.evals_helpers import run_closing, write_jsonl
from k2lab.agents.llm import LLM
from k2lab.evals import toolcall
from k2lab.evals.store import DatasetError
from k2lab.runs import RunDirError
from k2lab.testing.scripted_server import Faults, ScriptedServer

SHIPPED = {r["id"]: r for r in toolcall.load_dataset(toolcall.SEED_DATASET).rows}
PICK = ["tc-01", "tc-03", "tc-05", "tc-09", "tc-17", "tc-18"]

REPLIES = {  # what the scripted model does for each request, keyed by the user's words
    "tc-01": {"tool_calls": [{"name": "get_weather", "arguments": {"location": "Lisbon, Portugal"}}]},
    "tc-03": {"tool_calls": [{"name": "create_calendar_event", "arguments": {  # 'optional' must be a boolean
        "title": "Design review", "start": "2026-03-02T14:00", "duration_minutes": 45,
        "attendees": [{"email": "ana@example.com"}, {"email": "raj@example.com", "optional": "yes"}]}}]},
    "tc-05": {"tool_calls": [{"name": "search_flights", "arguments": {
        "origin": "SFO", "destination": "NRT", "date": "2026-05-18", "passengers": {"adults": 2, "children": 1},
        "cabin": "business", "max_stops": 1}}]},
    "tc-09": {"content": "Sure, I have sent it."},  # should have called send_email: a false negative
    "tc-17": {"tool_calls": [{"name": "get_weather", "arguments": "{location: Paris"}]},  # no tool needed
    "tc-18": {"content": "Crimson leaves drift down"},
}
BY_USER = {SHIPPED[i]["messages"][-1]["content"]: i for i in PICK}


def handler(replies=REPLIES, fail=frozenset()):
    def h(req):
        rid = BY_USER[req.messages[-1]["content"]]
        if rid in fail:
            raise RuntimeError(f"scripted failure for {rid}")
        return replies[rid]
    return h


def run(srv, dataset, run_dir, **kw):
    llm = LLM(base_url=srv.base_url, api_key="test", model=kw.pop("model", "m"),
              max_retries=kw.pop("max_retries", 0), backoff=(0.01, 0.05))
    return run_closing(toolcall.run_toolcalls(llm, settings(dataset, run_dir, **kw)), llm)


def settings(dataset, run_dir, **kw):
    return toolcall.ToolcallSettings(dataset=str(dataset), run_dir=str(run_dir), **kw)


@pytest.fixture
def dataset(tmp_path):
    return write_jsonl(tmp_path / "req.jsonl", [SHIPPED[i] for i in PICK])


def check_hand_computed(r):
    # tool-call responses: 01 (valid), 03 (invalid: optional="yes"), 05 (valid), 17 (args not JSON)
    assert (r["tool_call_responses"], r["schema_valid_responses"], r["schema_accuracy"]) == (4, 2, 0.5)
    # against `expect`: TP 01 03 05, FP 17, FN 09, TN 18
    fr = r["finish_reason"]
    assert (fr["tp"], fr["fp"], fr["fn"], fr["tn"]) == (3, 1, 1, 1)
    assert fr["precision"] == pytest.approx(0.75) and fr["recall"] == pytest.approx(0.75)
    assert fr["f1"] == pytest.approx(0.75)
    assert r["per_tool"]["get_weather"] == {"valid": 1, "calls": 2, "accuracy": 0.5}
    assert r["per_tool"]["create_calendar_event"]["valid"] == 0
    reasons = {c["id"]: c["reason"] for c in r["invalid_calls"]}
    assert "attendees/1/optional" in reasons["tc-03"] and "not JSON" in reasons["tc-17"]


def test_metrics_equal_hand_computed(dataset, tmp_path):
    with ScriptedServer(handler()) as srv:
        r = run(srv, dataset, tmp_path / "run")
    check_hand_computed(r)
    assert r["reference"] == "dataset expect" and r["errors"] == []
    assert (tmp_path / "run" / "plots" / "reliability.png").exists()
    assert "schema_accuracy" in (tmp_path / "run" / "report.md").read_text()


def test_incremental_mode_re_sends_only_failures(dataset, tmp_path):
    with ScriptedServer(handler(fail={"tc-05", "tc-18"})) as srv:
        r1 = run(srv, dataset, tmp_path / "run")
    assert sorted(e["id"] for e in r1["errors"]) == ["tc-05", "tc-18"] and r1["answered"] == 4
    with ScriptedServer(handler()) as srv:
        r2 = run(srv, dataset, tmp_path / "run", resume=True)
        assert srv.stats.requests == 2  # only the two failures were sent again
    check_hand_computed(r2)
    with ScriptedServer(handler()) as srv:
        run(srv, dataset, tmp_path / "run", resume=True)
        assert srv.stats.requests == 0
        with pytest.raises(RunDirError, match="model: 'm' there, 'other' now"):
            run(srv, dataset, tmp_path / "run", resume=True, model="other")


def test_retries_and_bounded_concurrency(dataset, tmp_path):
    faults = Faults(rate=0.4, kinds=("500", "429"), seed=3)
    with ScriptedServer(handler(), latency=0.05, faults=faults) as srv:
        llm = LLM(base_url=srv.base_url, api_key="test", model="m", max_retries=8, backoff=(0.01, 0.05),
                  max_concurrency=2)
        r = run_closing(toolcall.run_toolcalls(llm, settings(dataset, tmp_path / "run")), llm)
        assert srv.stats.max_inflight <= 2
        assert sum(srv.stats.faults.values()) > 0
    check_hand_computed(r)
    retries = [json.loads(line)["retries"] for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    assert sum(retries) == sum(srv.stats.faults.values())


def test_reference_run(dataset, tmp_path):
    with ScriptedServer(handler()) as srv:
        run(srv, dataset, tmp_path / "ref")
    calls_18 = {**REPLIES, "tc-18": {"tool_calls": [{"name": "send_email", "arguments": {
        "to": ["a@example.com"], "subject": "haiku", "body": "leaves"}}]}}
    with ScriptedServer(handler(calls_18)) as srv:
        r = run(srv, dataset, tmp_path / "run", reference=tmp_path / "ref")
    fr = r["finish_reason"]  # reference positives 01 03 05 17; this run adds 18
    assert (fr["tp"], fr["fp"], fr["fn"]) == (4, 1, 0)
    assert fr["f1"] == pytest.approx(2 * 0.8 * 1.0 / 1.8)
    assert r["schema_accuracy"] == pytest.approx(3 / 5)


def test_validate_calls_reasons():
    tools = SHIPPED["tc-05"]["tools"]
    ok = {"origin": "SFO", "destination": "NRT", "date": "2026-05-18", "passengers": {"adults": 1}}
    out = toolcall.validate_calls([
        {"name": "search_flights", "arguments": json.dumps(ok)},
        {"name": "search_flights", "arguments": json.dumps({**ok, "cabin": "sofa"})},
        {"name": "search_flights", "arguments": json.dumps({**ok, "passengers": {}})},
        {"name": "search_flights", "arguments": json.dumps({**ok, "origin": "sfo"})},
        {"name": "book_hotel", "arguments": "{}"}], tools)
    assert out[0] is None
    assert "cabin" in out[1] and "is not one of" in out[1]
    assert "passengers" in out[2] and "'adults' is a required property" in out[2]
    assert "origin" in out[3]
    assert out[4] == "undeclared tool 'book_hotel'"


def test_bad_rows(tmp_path):
    good = SHIPPED["tc-01"]
    bad_schema = {**good, "id": "b", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": "zero"}}}}}]}
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps({"messages": []}), json.dumps(bad_schema),
                               json.dumps({**good, "id": "c", "expect": "maybe"})]) + "\n")
    with pytest.raises(DatasetError, match=r"r.jsonl:2: field 'messages' must be a non-empty list"):
        toolcall.load_dataset(path)
    data = toolcall.load_dataset(path, "skip")
    assert [r["id"] for r in data.rows] == ["tc-01"]
    assert "r.jsonl:3: tools[0] (f): invalid JSON schema" in data.skipped[1]
    assert data.skipped[2].startswith(f"{path}:4: field 'expect'")


def test_shipped_request_set_covers_the_schema_features():
    rows = list(SHIPPED.values())
    assert len(rows) >= 20 and sum(r["expect"] == "stop" for r in rows) >= 6
    params = [t["function"]["parameters"] for r in rows for t in r["tools"]]

    def walk(schema):
        yield schema
        subs = list((schema.get("properties") or {}).values())
        if "items" in schema:
            subs.append(schema["items"])
        for sub in subs:
            yield from walk(sub)

    nodes = [n for p in params for n in walk(p)]
    assert any(n.get("type") == "object" for p in params for n in list(walk(p))[1:])  # nested objects
    assert any("enum" in n for n in nodes)
    assert any(n.get("type") == "array" and n.get("items", {}).get("type") == "object" for n in nodes)
    assert any(set(p["properties"]) - set(p.get("required", [])) for p in params)  # optional fields
