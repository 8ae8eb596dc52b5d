"""Tools: Python functions with JSON schemas derived from their type hints (pydantic), and the built-in ones.

`@tool` turns a function (sync or async) into a `Tool`: its parameters become a pydantic model, whose JSON
schema is what the model sees. Calling a tool validates the arguments first; bad JSON, a validation error or an
exception inside the function comes back as the tool result text (`error: ...`), so the model can correct
itself and the agent never crashes on a tool. Built-ins work inside a `Sandbox` workspace: run Python, run a
shell command, read / write / list files (paths are resolved and must stay inside the workspace).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pydantic

from k2lab.agents.sandbox import Sandbox
from k2lab.runs import write_atomic


class ArgumentError(ValueError):
    """Arguments that do not match a tool's schema; the message goes back to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]  # called with the validated arguments as keywords
    validate: Callable[[dict], dict]  # arguments -> validated arguments; raises ArgumentError
    with_step: bool = False  # fn also takes `step`, the caller's step number (not part of the schema)

    @property
    def spec(self) -> dict:
        """OpenAI function-tool definition."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                  "parameters": self.parameters}}

    async def __call__(self, arguments: str | dict, step: int = 0) -> str:
        """Validate and run; always returns text. `step` is passed on to tools made `with_step`."""
        try:
            args = json.loads(arguments or "{}") if isinstance(arguments, str) else arguments
            if not isinstance(args, dict):
                raise ArgumentError(f"expected a JSON object, got {type(args).__name__}")
            kwargs = self.validate(args)
        except json.JSONDecodeError as e:
            return f"error: arguments of {self.name} are not valid JSON ({e.msg} at position {e.pos})"
        except ArgumentError as e:
            return f"error: invalid arguments for {self.name}: {e}"
        if self.with_step:
            kwargs["step"] = step
        try:
            if inspect.iscoroutinefunction(self.fn):
                out = await self.fn(**kwargs)
            else:
                out = await asyncio.to_thread(self.fn, **kwargs)
        except Exception as e:  # the model sees the failure and may retry differently
            return f"error: {self.name} raised {type(e).__name__}: {e}"
        return out if isinstance(out, str) else json.dumps(out, default=str)


def _pydantic_validator(model: type[pydantic.BaseModel]) -> Callable[[dict], dict]:
    def validate(args: dict) -> dict:
        try:
            values = model.model_validate(args)
        except pydantic.ValidationError as e:
            raise ArgumentError("; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                                          for err in e.errors())) from None
        return {k: getattr(values, k) for k in model.model_fields}
    return validate


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         with_step: bool = False):
    """Decorator (bare or with arguments): a function with type-hinted parameters becomes a Tool.

    `with_step=True`: the function's `step` parameter is left out of the schema and receives the calling
    agent's step number (the swarm's `assign_task` records which orchestrator step started a sub-agent)."""
    def wrap(f: Callable) -> Tool:
        fields = {}
        for p in inspect.signature(f).parameters.values():
            if with_step and p.name == "step":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {f.__name__}: *args/**kwargs cannot be described by a schema")
            if p.annotation is inspect.Parameter.empty:
                raise TypeError(f"tool {f.__name__}: parameter {p.name!r} needs a type hint")
            fields[p.name] = (p.annotation, ... if p.default is inspect.Parameter.empty else p.default)
        params = pydantic.create_model(f"{f.__name__}_params", __config__=pydantic.ConfigDict(extra="forbid"),
                                       **fields)
        schema = params.model_json_schema()
        schema.pop("title", None)
        return Tool(name or f.__name__, description or inspect.getdoc(f) or "", schema, f,
                    _pydantic_validator(params), with_step)
    return wrap(fn) if fn is not None else wrap


def inside(workspace: Path, path: str) -> Path:
    """Resolve `path` against the workspace (following symlinks); refuse anything that lands outside it."""
    target = (workspace / path).resolve()
    if target != workspace and workspace not in target.parents:
        raise PermissionError(f"{path!r} is outside the workspace")
    return target


def workspace_tools(sandbox: Sandbox) -> list[Tool]:
    """run_python, run_shell, read_file, write_file, list_files, all confined to `sandbox.workspace`."""
    ws = sandbox.workspace

    @tool
    async def run_python(code: str) -> str:
        """Run Python code in the sandbox (own workspace, no network, CPU/memory/time limits); returns output."""
        return (await sandbox.python(code)).as_text()

    @tool
    async def run_shell(command: str) -> str:
        """Run a shell command (/bin/sh -c) in the sandbox; returns output and exit code."""
        return (await sandbox.shell(command)).as_text()

    @tool
    def read_file(path: str, max_chars: int = 20_000) -> str:
        """Read a text file from the workspace."""
        text = inside(ws, path).read_text(errors="replace")
        return text if len(text) <= max_chars else text[:max_chars] + f"\n[... {len(text) - max_chars} more chars]"

    @tool
    def write_file(path: str, content: str) -> str:
        """Write a text file in the workspace (parent folders are created)."""
        target = inside(ws, path)
        write_atomic(target, content)
        return f"wrote {len(content)} chars to {target.relative_to(ws)}"

    @tool
    def list_files(path: str = ".") -> str:
        """List files under a workspace folder (recursive, at most 500 entries)."""
        root = inside(ws, path)
        names = sorted(str(p.relative_to(ws)) + ("/" if p.is_dir() else "") for p in root.rglob("*"))
        return "\n".join(names[:500]) or "(empty)"

    return [run_python, run_shell, read_file, write_file, list_files]
