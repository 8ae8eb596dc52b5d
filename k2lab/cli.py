"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command()
def agent(task: str, mcp: list[str] = typer.Option([], help="MCP server: a URL or a command line (repeatable)"),
          workspace: Path = typer.Option(Path("workspace"), help="the agent's working directory"),
          run_dir: Path = typer.Option(None, help="where trace.jsonl and result.json go"),
          max_steps: int = typer.Option(50)) -> None:
    """Run one agent on TASK against K2LAB_BASE_URL / K2LAB_MODEL."""
    from k2lab.agents.agent import run_agent
    res = run_agent(task, workspace, mcp, run_dir, max_steps)
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}".rstrip())


@app.command()
def swarm(task: str = typer.Argument(None), resume: Path = typer.Option(None, help="continue this run dir"),
          run_dir: Path = typer.Option(None), max_subagents: int = typer.Option(300),
          max_tool_calls: int = typer.Option(4000), max_concurrency: int = typer.Option(300),
          mcp: list[str] = typer.Option([], help="MCP server for the sub-agents: URL or command line")) -> None:
    """Run an agent swarm on TASK (or --resume RUN_DIR); prints the answer and the run directory."""
    from k2lab.agents.swarm import run_swarm
    res = run_swarm(task, resume or run_dir, resume is not None, max_subagents, max_tool_calls,
                    max_concurrency, mcp)
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}\n{res.metrics}\nrun dir: {res.run_dir}")


@app.command()
def trace(run_dir: Path) -> None:
    """Print the span tree of a run with per-agent cost."""
    from k2lab.agents.trace import render_tree
    typer.echo(render_tree(run_dir))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
