"""MCP servers as tool sources, through the official `mcp` SDK (`mcp.Client`, SDK 2.x).

A source is a URL (streamable HTTP) or a command line (stdio: the server runs as a subprocess). Each MCP tool
becomes a `Tool` whose schema is the server's input schema; arguments are checked against it with jsonschema
before the call, and an `is_error` result comes back as `error: ...` text. A server that cannot be started or
reached raises `MCPStartError` naming it.
"""

from __future__ import annotations

import shlex
from contextlib import AsyncExitStack

import jsonschema
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from k2lab.agents.tools import ArgumentError, Tool


class MCPStartError(ValueError):
    """An MCP server that could not be started (stdio) or reached (HTTP); the message names it and why."""


def _first_cause(e: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: what actually went wrong inside the SDK's task groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def server_target(spec: str) -> StdioServerParameters | str:
    """'https://host/mcp' -> the URL; 'uvx mcp-server-time --local-timezone UTC' -> stdio parameters."""
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        return spec
    argv = shlex.split(spec)
    if not argv:
        raise ValueError("empty MCP server spec: give a URL or a command line")
    return StdioServerParameters(command=argv[0], args=argv[1:])


def _text(result) -> str:
    parts = [getattr(c, "text", None) or c.model_dump_json() for c in result.content]
    return "\n".join(parts)


def _tool(client: Client, t) -> Tool:
    schema = t.input_schema or {"type": "object", "properties": {}}
    validator = jsonschema.Draft202012Validator(schema)

    def validate(args: dict) -> dict:
        errors = sorted(validator.iter_errors(args), key=lambda e: list(e.path))
        if errors:
            raise ArgumentError("; ".join(f"{'.'.join(map(str, e.path)) or 'arguments'}: {e.message}"
                                          for e in errors))
        return args

    async def call(**kwargs) -> str:
        result = await client.call_tool(t.name, kwargs)
        return f"error: {_text(result)}" if result.is_error else _text(result)

    return Tool(t.name, t.description or "", schema, call, validate)


class MCPTools:
    """`async with MCPTools(["uvx mcp-server-time", "http://127.0.0.1:8000/mcp"]) as tools: ...`"""

    def __init__(self, specs: list[str]):
        self.targets = [(s, server_target(s)) for s in specs]
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> list[Tool]:
        tools: dict[str, Tool] = {}
        try:
            for spec, target in self.targets:
                try:
                    client = await self._stack.enter_async_context(Client(target))
                    listed = (await client.list_tools()).tools
                except Exception as e:
                    cause = _first_cause(e)
                    how = "reached" if isinstance(target, str) else "started"
                    raise MCPStartError(f"MCP server {spec!r} could not be {how} ({type(cause).__name__}: "
                                        f"{cause}); check that it runs on its own") from e
                for t in listed:
                    if t.name in tools:
                        raise ValueError(f"MCP tool {t.name!r} is offered by two servers")
                    tools[t.name] = _tool(client, t)
        except BaseException:
            await self._stack.aclose()
            raise
        return list(tools.values())

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()
