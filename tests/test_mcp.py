"""MCP tool sources through the official SDK: `mcp-server-time` from PyPI over stdio, and a server built with the
SDK's MCPServer over streamable HTTP. Model decisions come from the scripted server (a real OpenAI-compatible
HTTP server on loopback that plays back scripted replies; a test double for the model)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from k2lab.agents.mcp import MCPTools, server_target
from k2lab.testing.scripted_server import ScriptedServer

TIME_SERVER = f"{sys.executable} -m mcp_server_time --local-timezone UTC"


def test_server_spec_parsing():
    assert server_target("http://127.0.0.1:8000/mcp") == "http://127.0.0.1:8000/mcp"
    p = server_target("uvx mcp-server-time --local-timezone 'Europe/Paris'")
    assert p.command == "uvx" and p.args == ["mcp-server-time", "--local-timezone", "Europe/Paris"]
    with pytest.raises(ValueError, match="empty MCP"):
        server_target("  ")


def test_mcp_server_time_over_stdio():
    async def go():
        async with MCPTools([TIME_SERVER]) as tools:
            by_name = {t.name: t for t in tools}
            spec = by_name["convert_time"].spec["function"]
            out = await by_name["convert_time"](json.dumps(
                {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}))
            bad = await by_name["get_current_time"]("{}")
            err = await by_name["convert_time"](json.dumps(
                {"source_timezone": "Mars/Olympus", "time": "12:00", "target_timezone": "UTC"}))
            return spec, out, bad, err
    spec, out, bad, err = asyncio.run(go())
    assert set(spec["parameters"]["required"]) == {"source_timezone", "time", "target_timezone"}
    assert json.loads(out)["target"]["datetime"].endswith("T21:00:00+09:00")
    assert bad == "error: invalid arguments for get_current_time: arguments: 'timezone' is a required property"
    assert err.startswith("error:")


def test_cli_agent_uses_an_mcp_tool(tmp_path):
    def reply(req):
        if req.step == 0:
            assert "convert_time" in req.tools and "run_python" in req.tools
            return {"tool_calls": [{"name": "convert_time", "arguments": {
                "source_timezone": "UTC", "time": "09:30", "target_timezone": "America/New_York"}}]}
        converted = json.loads(req.tool_results[0]["content"])
        return {"content": f"New York: {converted['target']['datetime']}"}
    with ScriptedServer(reply) as srv:
        env = {**os.environ, "K2LAB_BASE_URL": srv.base_url, "K2LAB_API_KEY": "k", "K2LAB_MODEL": "m"}
        out = subprocess.run([sys.executable, "-m", "k2lab.cli", "agent", "what time in NY?", "--mcp", TIME_SERVER,
                              "--workspace", str(tmp_path / "ws"), "--run-dir", str(tmp_path / "run")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ny = datetime.fromisoformat(out.stdout.split("New York: ")[1].split()[0])
    assert ny.utcoffset() in (timedelta(hours=-5), timedelta(hours=-4))
    assert ny.astimezone(timezone.utc).strftime("%H:%M") == "09:30"
    assert "outcome: completed" in out.stdout
    spans = [json.loads(line) for line in (tmp_path / "run" / "trace.jsonl").read_text().splitlines()]
    assert [s["name"] for s in spans if s["kind"] == "tool"] == ["convert_time"]


HTTP_SERVER = """
import sys
from mcp.server.mcpserver import MCPServer
app = MCPServer("adder")

@app.tool()
def add(a: int, b: int) -> int:
    '''Add two integers.'''
    return a + b

app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"""


def test_streamable_http_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "adder.py"
    script.write_text(HTTP_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

        async def go():
            async with MCPTools([f"http://127.0.0.1:{port}/mcp"]) as tools:
                (add,) = tools
                return add.spec["function"], await add('{"a": 2, "b": 40}'), await add('{"a": "x", "b": 1}')
        spec, out, bad = asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()
    assert spec["name"] == "add" and spec["description"] == "Add two integers."
    assert out == "42" and bad.startswith("error: invalid arguments for add: a:")
