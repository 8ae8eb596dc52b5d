"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage.

User mistakes (a missing file, a foreign run directory, no endpoint...) end in one line naming the problem and
what to do, exit code 1; `--debug` or `K2LAB_DEBUG=1` shows the traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
import typer.core


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input or setup is wrong", not "k2lab is broken" (imported late: they
    live in the stages, and `k2lab --help` should not import torch)."""
    from k2lab.agents.llm import ContextLengthError, EndpointError
    from k2lab.agents.mcp import MCPStartError
    from k2lab.checkpoint import CheckpointError
    from k2lab.config import ConfigError
    from k2lab.data import DatasetError
    from k2lab.evals.judge import JudgeError
    from k2lab.model.vision import MediaInputError
    from k2lab.runs import RunDirError

    return (CheckpointError, ConfigError, ContextLengthError, DatasetError, EndpointError, JudgeError,
            MCPStartError, MediaInputError, RunDirError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError)


def user_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:  # "[Errno 2] No such file ..." -> the file and why
        return f"{e.filename}: {e.strerror.lower()}; check the path"
    return str(e)


def _placeholder(param) -> str:
    """A readable placeholder for an option's value, from its name and type (typer would print `<int>`)."""
    name = param.name or ""
    if name.endswith(("dir", "checkpoint", "workspace")) or name in ("out", "resume"):
        return "DIR"
    if name in ("data", "dataset", "tools", "messages") or name.endswith("file"):
        return "FILE"
    for part, label in (("url", "URL"), ("key", "KEY"), ("host", "HOST"), ("model", "NAME"), ("name", "NAME")):
        if part in name:
            return label
    annotation = str(getattr(getattr(param, "type_descriptor", None), "annotation", ""))
    return "N" if "int" in annotation else "X" if "float" in annotation else "TEXT"


def _label_options(command) -> None:
    for param in command.params:
        if getattr(param, "param_type_name", "") == "argument":  # `TASK  what ...`, not `TASK <str>`
            param.display_type_rich = lambda ctx: ""
        elif getattr(param, "param_type_name", "") == "option" and not getattr(param, "is_flag", False) and \
                param.metavar is None:
            param.metavar = _placeholder(param)
    for sub in getattr(command, "commands", {}).values():
        _label_options(sub)


class Group(typer.core.TyperGroup):
    """The top-level command group: turns user mistakes raised by any command into one line, and gives every
    option without its own placeholder a readable one."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _label_options(command)
        return command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            if ctx.meta.get("k2lab.debug") or not isinstance(e, user_errors()):
                raise
            typer.echo(f"error: {user_message(e)}", err=True)
            raise typer.Exit(1) from None


# plain (not rich) help and usage errors: no type labels on flags, and a usage error is a few plain lines
app = typer.Typer(cls=Group, help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.callback()
def main_options(ctx: typer.Context,
                 debug: bool = typer.Option(False, "--debug", envvar="K2LAB_DEBUG",
                                            help="show the full traceback of an error (or K2LAB_DEBUG=1)")) -> None:
    """k2lab: the Kimi K2.6 system at laptop scale."""
    ctx.meta["k2lab.debug"] = debug


@app.command()
def info(preset: Optional[str] = typer.Option(None, metavar="NAME",
                                              help="a preset: kimi-k2, kimi-k2.5, kimi-k2.6, tiny, small"),
         checkpoint: Optional[Path] = typer.Option(None, metavar="DIR",
                                                   help="a checkpoint directory (reads its config.json)")):
    """Print total and active parameter counts (from a model built on the meta device) and cache bytes/token."""
    from k2lab.report import model_info

    if (preset is None) == (checkpoint is None):
        raise typer.BadParameter("give exactly one of --preset and --checkpoint")
    typer.echo(model_info(preset=preset, checkpoint=checkpoint))


@app.command()
def generate(checkpoint: Path = typer.Option(..., metavar="DIR", help="checkpoint directory"),
             prompt: Optional[str] = typer.Option(None, metavar="TEXT",
                                                  help="prompt text (needs the checkpoint's tokenizer)"),
             prompt_ids: Optional[str] = typer.Option(None, metavar="IDS",
                                                      help="prompt token ids, comma-separated: 1,2,3"),
             max_new_tokens: int = typer.Option(64, min=1, metavar="N"),
             temperature: float = typer.Option(0.0, min=0.0, metavar="T", help="0 is greedy"),
             top_p: float = typer.Option(1.0, min=0.0, max=1.0, metavar="P"),
             seed: Optional[int] = typer.Option(None, metavar="N"),
             compile: bool = typer.Option(False, "--compile/--no-compile",
                                          help="decode through the compiled step (pays off for long outputs)")):
    """Generate a continuation of a prompt from a checkpoint (with --prompt-ids: the ids, then the decoded text
    when the checkpoint has a tokenizer)."""
    from k2lab.report import generate_text

    if (prompt is None) == (prompt_ids is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-ids")
    typer.echo(generate_text(checkpoint, prompt, prompt_ids, max_new_tokens, temperature, top_p, seed, compile))


# ---- pre-training and QAT (issues 4, 12) ----
def _user_errors(run):
    """Run `run()`; a mistake in the input (ValueError, a missing file) is one line on stderr and exit code 1."""
    try:
        return run()
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _settings_options(command, settings: str = "PretrainSettings"):
    """Give `command(**settings)` one option per field of the settings class named `settings` in
    k2lab.train.settings (type, default and help from the field), so the command line and the settings cannot
    drift apart."""
    import inspect

    from k2lab.train import settings as settings_module

    params = []
    for f, typ, optional in settings_module.settings_fields(getattr(settings_module, settings)):
        if f.name == "data":
            annotation, default, metavar = Optional[list[Path]], None, "FILE"
        else:
            annotation, default, metavar = (Optional[typ] if optional else typ), f.default, None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(default, help=f.metadata["help"], metavar=metavar)))
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@app.command()
@_settings_options
def pretrain(**settings):
    """Pre-train with MuonClip (or Muon / AdamW; --qat for INT4 experts); checkpoints, metrics.jsonl, TensorBoard
    and plots in --run-dir, which a rerun resumes."""
    import json

    from k2lab.train.pretrain import PretrainSettings, pretrain as run

    settings["data"] = [str(p) for p in settings["data"] or []]
    typer.echo(json.dumps(_user_errors(lambda: run(PretrainSettings(**settings)))))



@app.command()
@(lambda command: _settings_options(command, "RLSettings"))
def rl(**settings):
    """RL from a checkpoint on the embedded environments (--env arithmetic,knowledge,store,files,lookup) with the
    K1.5 objective (or --loss k25 / grpo); rollouts in process, or on an OpenAI-compatible server (--rollout-url,
    weights reloaded between steps); metrics, plots and checkpoints in --run-dir, which a rerun resumes. Under
    torchrun: python -m k2lab.train.rl.run with the same flags."""
    import json

    from k2lab.train.rl.run import rl as run
    from k2lab.train.settings import RLSettings

    typer.echo(json.dumps(_user_errors(lambda: run(RLSettings(**settings)))))


def sft(**settings):
    """Supervised fine-tuning of --checkpoint on chat JSONL (--data): loss on assistant output only, packed rows
    without attention across conversations, MuonClip (--qat for INT4 experts); held-out loss and the tool-call
    eval every --eval-every steps; checkpoints, metrics.jsonl and plots in --run-dir, which a rerun resumes."""
    import json

    from k2lab.train.sft import sft as run
    from k2lab.train.settings import SftSettings

    settings["data"] = [str(p) for p in settings["data"] or []]
    typer.echo(json.dumps(_user_errors(lambda: run(SftSettings(**settings)))))


app.command("sft")(_settings_options(sft, "SftSettings"))


@app.command()
def demo(run_dir: Path = typer.Option(Path("runs/demo"), metavar="DIR", help="run directory (reruns resume it)"),
         preset: str = typer.Option("default", help="recipe preset: default (sized for 30 min on 2 CPU cores), "
                                                     "small, gpu, reduced (k2lab/pipeline/presets.py)")):
    """The whole K2.6 recipe on the embedded data (what `make run` runs): tokenizer, MuonClip pre-training,
    synthesis, SFT, RL, INT4 QAT, the INT4 model served with agent and swarm runs, evals after every stage;
    report card in DIR/report.md. A rerun skips finished stages and resumes an unfinished one."""
    from k2lab.pipeline import PRESETS, run_demo
    from k2lab.runs import RunDirError

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    try:
        run_demo(run_dir, preset)
    except RunDirError as e:
        typer.echo(f"error: {e}", err=True)
        if os.environ.get("MAKELEVEL"):  # started by `make run`: say how to pass another directory there
            typer.echo(f"  with make: `make run RUN_DIR=runs/other`, or remove {run_dir} to start over", err=True)
        raise typer.Exit(2) from None


# ---- tokenizer, chat format, tool calls (issue 3) ----
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    vocab_size: int = typer.Option(..., "--vocab-size", help="total vocabulary, 256 special ids included"),
    out: str = typer.Option(..., "--out", help="directory for tiktoken.model + tokenizer_config.json"),
    paths: list[str] = typer.Argument(None, help="text files to train on (default: the embedded corpus)"),
    max_bytes: int = typer.Option(None, "--max-bytes",
                                  help="bytes of training text (default 256 per vocab entry; 0: all)"),
) -> None:
    """Train a BPE vocabulary with the K2 split pattern and special tokens."""
    import time

    from k2lab.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    tok = _user_errors(lambda: train_tokenizer(vocab_size, paths or None, out_dir=out, max_bytes=max_bytes,
                                               show_progress=True))
    typer.echo(f"vocab {tok.vocab_size} ({tok.vocab_size - 256} BPE ranks + 256 special) in "
               f"{time.perf_counter() - t0:.1f}s -> {out}")


@app.command("render")
def render_cmd(
    messages: str = typer.Option(..., "--messages", metavar="JSON|FILE",
                                 help="a JSON list of messages or an object {messages, tools}: inline or a file"),
    tools: str = typer.Option(None, "--tools", metavar="JSON|FILE",
                              help="a JSON list of tool declarations: inline or a file"),
    generation_prompt: bool = typer.Option(False, "--generation-prompt", help="end with the assistant header"),
    chat_format: str = typer.Option("k2.6", "--format", help="the chat format: k2.6 (K2.5/K2.6) or k2-instruct"),
    thinking: bool = typer.Option(True, "--thinking/--no-thinking", help="K2.6: thinking mode"),
    preserve_thinking: bool = typer.Option(False, "--preserve-thinking", help="K2.6: keep every turn's reasoning"),
) -> None:
    """Print a conversation in a K2 chat format."""
    from k2lab.data import DatasetError
    from k2lab.tokenizer.chat import load_conversation, render
    from k2lab.tokenizer.templates import check_format

    try:
        check_format(chat_format)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--format") from None
    msgs, tls = load_conversation(messages, tools)
    try:
        text = render(msgs, tls, add_generation_prompt=generation_prompt, chat_format=chat_format,
                      thinking=thinking, preserve_thinking=preserve_thinking)
    except ValueError as e:  # render validates each message and tool and names the bad one
        raise DatasetError(f"--messages / --tools: {e}") from None
    typer.echo(text, nl=False)


@app.command("parse-tool-calls")
def parse_tool_calls_cmd(
    in_reasoning: bool = typer.Option(False, "--in-reasoning",
                                      help="the prompt ended with <think> (K2.6 thinking mode)"),
) -> None:
    """Read K2 assistant output on stdin; print content, reasoning, tool calls and errors as JSON."""
    import dataclasses
    import json
    import sys

    from k2lab.tokenizer.toolcalls import parse

    parsed = parse(sys.stdin.read(), in_reasoning=in_reasoning)
    typer.echo(json.dumps(dataclasses.asdict(parsed), ensure_ascii=False, indent=2))


# ---- agents and the agent swarm (issue 7) ----
BASE_URL = typer.Option(None, metavar="URL",
                        help="OpenAI-compatible endpoint (default K2LAB_BASE_URL / OPENAI_BASE_URL)")
API_KEY = typer.Option(None, metavar="KEY", help="its API key (default K2LAB_API_KEY / OPENAI_API_KEY)")
MODEL = typer.Option(None, metavar="NAME",
                     help="model name (default K2LAB_MODEL / OPENAI_MODEL, else the endpoint's only model)")
MCP = typer.Option([], metavar="URL|COMMAND", help="an MCP server: a URL or a command line (repeatable)")
CALL_MAX_TOKENS = typer.Option(None, "--max-tokens", min=1, metavar="N",
                               help="tokens one model call may generate (default: the endpoint's own limit; a model "
                                    "that never ends its turn then writes to the end of its context)")
CALL_TEMPERATURE = typer.Option(None, "--temperature", min=0.0, metavar="T",
                                help="sampling temperature of every model call, 0 greedy (default: the endpoint's)")


def _sampling(max_tokens: int | None, temperature: float | None) -> dict:
    """The request fields the options set; the ones left out are the endpoint's to choose."""
    return {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}


def _task(task: str | None) -> str:
    if not task or not task.strip():
        raise typer.BadParameter("the task is empty; give what to do as the first argument, in quotes")
    return task


@app.command()
def agent(task: str = typer.Argument(..., metavar="TASK", help="what the agent should do (in quotes)"),
          mcp: list[str] = MCP,
          workspace: Path = typer.Option(Path("workspace"), metavar="DIR", help="the agent's working directory"),
          run_dir: Path = typer.Option(None, metavar="DIR", help="where trace.jsonl and result.json go"),
          max_steps: int = typer.Option(50, min=1, metavar="N", help="model calls at most"),
          max_tokens: int = CALL_MAX_TOKENS, temperature: float = CALL_TEMPERATURE,
          base_url: str = BASE_URL, api_key: str = API_KEY, model: str = MODEL) -> None:
    """Run one agent on TASK with workspace (and MCP) tools."""
    from k2lab.agents.agent import run_agent
    from k2lab.agents.llm import LLM

    task = _task(task)
    res = run_agent(task, LLM(base_url=base_url, api_key=api_key, model=model), workspace, mcp, run_dir, max_steps,
                    _sampling(max_tokens, temperature))
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}".rstrip())


@app.command()
def swarm(task: str = typer.Argument(None, metavar="TASK", help="what the swarm should do (in quotes)"),
          resume: Path = typer.Option(None, metavar="DIR", help="continue the run in this directory"),
          run_dir: Path = typer.Option(None, metavar="DIR", help="default runs/swarm-DATE-TIME"),
          max_subagents: int = typer.Option(300, min=1, metavar="N"),
          max_tool_calls: int = typer.Option(4000, min=1, metavar="N", help="across the swarm"),
          max_concurrency: int = typer.Option(300, min=1, metavar="N", help="sub-agents running at once"),
          max_tokens: int = CALL_MAX_TOKENS, temperature: float = CALL_TEMPERATURE,
          mcp: list[str] = MCP, base_url: str = BASE_URL, api_key: str = API_KEY, model: str = MODEL) -> None:
    """Run an agent swarm on TASK (or --resume DIR); prints the answer, the metrics and the run directory."""
    import dataclasses

    from k2lab.agents.llm import LLM
    from k2lab.agents.swarm import SwarmLimits, run_swarm

    if resume is None:
        _task(task)
    elif task:
        raise typer.BadParameter("--resume continues the journaled task; give no TASK with it")
    llm = LLM(base_url=base_url, api_key=api_key, model=model)
    res = run_swarm(task, llm, resume or run_dir, resume is not None,
                    SwarmLimits(max_subagents, max_tool_calls, max_concurrency), mcp,
                    _sampling(max_tokens, temperature))
    metrics = "  ".join(f"{k} {v}" for k, v in dataclasses.asdict(res.metrics).items())
    typer.echo(f"\n{res.output}\n\noutcome: {res.outcome} {res.reason}\n{metrics}\nrun dir: {res.run_dir}")


@app.command()
def trace(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="an agent or swarm run directory")) -> None:
    """Print the span tree of a run with per-agent cost."""
    from k2lab.agents.trace import render_tree
    typer.echo(render_tree(run_dir))


# ---- evals (issue 8) ----------------------------------------------------------------------------------------
eval_app = typer.Typer(help="Evaluations: calibration, tool calls, coding.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(eval_app, name="eval")
ON_ERROR = typer.Option("stop", metavar="stop|skip", help="a bad dataset row stops the run, or is skipped and reported")
RESUME = typer.Option(False, "--resume", help="continue the run in --run-dir without redoing finished items")
CONCURRENCY = typer.Option(8, min=1, metavar="N", help="requests at once")
MAX_TOKENS = typer.Option(512, min=1, metavar="N", help="cap on each generated reply")


def _settings(cls, **kw):
    """A settings dataclass from the options; what its checks refuse is a usage error."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@eval_app.command("calibration")
def eval_calibration(
    dataset: str = typer.Option(None, metavar="FILE", help="JSONL/CSV of domain, topic, question, answer (default: "
                                                           "the shipped seed set)"),
    model: str = MODEL, base_url: str = BASE_URL, api_key: str = API_KEY,
    judge_model: list[str] = typer.Option([], metavar="NAME", help="judge model; repeat for several judges that vote"),
    judge_base_url: str = typer.Option(None, metavar="URL", help="endpoint of the judges (default: --base-url)"),
    judge_api_key: str = typer.Option(None, envvar="K2LAB_JUDGE_API_KEY", metavar="KEY",
                                      help="key for the judge endpoint (default: --api-key on the same endpoint)"),
    run_dir: str = typer.Option("runs/eval-calibration", metavar="DIR"),
    partial: str = typer.Option("incorrect", metavar="incorrect|abstain",
                                help="count PARTIAL_ANSWER as a wrong answer or as not attempted"),
    resume: bool = RESUME, on_error: str = ON_ERROR, concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS,
    grader: str = typer.Option("judge", metavar="judge|rules",
                               help="'judge' (LLM judges, free-form answers) or 'rules' (deterministic, offline: "
                                    "normalized match and abstention detection, closed-form answers)"),
) -> None:
    """AA-Omniscience-style calibration: Omniscience Index, accuracy, hallucination rate per domain."""
    from k2lab.evals import calibration

    problems = [f"--dataset {dataset}: no such file"] if dataset and not Path(dataset).is_file() else []
    if not judge_model and grader == "judge":
        problems.append("give at least one --judge-model (or --grader rules)")
    if problems:  # every wrong option at once, not one per attempt
        raise typer.BadParameter("; ".join(problems))
    r = calibration.main(_settings(
        calibration.CalibrationSettings, judge_models=judge_model, dataset=dataset, model=model, base_url=base_url,
        api_key=api_key, judge_base_url=judge_base_url, judge_api_key=judge_api_key, run_dir=run_dir,
        partial=partial, resume=resume, on_error=on_error, concurrency=concurrency, max_tokens=max_tokens,
        grader=grader))
    typer.echo(f"Omniscience Index {r['overall']['omniscience_index']}  accuracy {r['overall']['accuracy']}  "
               f"hallucination rate {r['overall']['hallucination_rate']}  -> {run_dir}/report.md")


@eval_app.command("compare-graders")
def eval_compare_graders(
    run_dir: str = typer.Argument(..., help="a calibration run directory graded by judges"),
) -> None:
    """Grade a judged calibration run again with the deterministic rules: agreement, Cohen's kappa, disagreements."""
    from k2lab.evals import calibration, rules
    from k2lab.runs import write_json

    r = rules.compare_graders(calibration.load_items(run_dir))
    write_json(f"{run_dir}/grader_agreement.json", r)
    typer.echo(f"{r['items']} items  agreement {r['agreement']:.3f}  kappa {r['cohen_kappa']}  "
               f"-> {run_dir}/grader_agreement.json")


@eval_app.command("toolcalls")
def eval_toolcalls(
    dataset: str = typer.Option(None, metavar="FILE", help="JSONL of chat-completion request bodies (default: the "
                                                           "shipped set)"),
    model: str = MODEL, base_url: str = BASE_URL, api_key: str = API_KEY,
    run_dir: str = typer.Option("runs/eval-toolcalls", metavar="DIR"),
    reference: str = typer.Option(None, metavar="DIR", help="a reference run for finish_reason precision/recall "
                                                            "(default: the rows' expect)"),
    resume: bool = RESUME, on_error: str = ON_ERROR, concurrency: int = CONCURRENCY,
    max_retries: int = typer.Option(6, min=0, metavar="N", help="retries of a failed request"),
    max_tokens: int = typer.Option(512, min=1, metavar="N", help="cap for requests that set no max_tokens"),
) -> None:
    """K2-Vendor-Verifier-style tool-call accuracy: schema_accuracy and finish_reason F1."""
    from k2lab.evals import toolcall

    r = toolcall.main(_settings(
        toolcall.ToolcallSettings, dataset=dataset, model=model, base_url=base_url, api_key=api_key,
        run_dir=run_dir, reference=reference, resume=resume, on_error=on_error, concurrency=concurrency,
        max_retries=max_retries, max_tokens=max_tokens))
    typer.echo(f"schema_accuracy {r['schema_accuracy']}  finish_reason F1 {(r.get('finish_reason') or {}).get('f1')}"
               f"  -> {run_dir}/report.md")


@eval_app.command("coding")
def eval_coding(
    dataset: str = typer.Option(None, metavar="FILE", help="JSONL of id, prompt, tests (default: the shipped set)"),
    model: str = MODEL, base_url: str = BASE_URL, api_key: str = API_KEY,
    run_dir: str = typer.Option("runs/eval-coding", metavar="DIR"),
    n: int = typer.Option(1, metavar="N", help="samples per problem"),
    k: list[int] = typer.Option([1], metavar="K", help="pass@k; repeat for several"),
    temperature: float = typer.Option(0.0, min=0.0, metavar="T"),
    max_tokens: int = typer.Option(1024, min=1, metavar="N", help="cap on each solution"),
    resume: bool = RESUME, on_error: str = ON_ERROR, concurrency: int = CONCURRENCY,
) -> None:
    """Sampled solutions run against unit tests in the sandbox; unbiased pass@k."""
    from k2lab.evals import coding

    r = coding.main(_settings(
        coding.CodingSettings, dataset=dataset, model=model, base_url=base_url, api_key=api_key, run_dir=run_dir,
        n=n, ks=tuple(k), temperature=temperature, max_tokens=max_tokens, resume=resume, on_error=on_error,
        concurrency=concurrency))
    typer.echo(f"pass@k {r['pass_at_k']}  -> {run_dir}/report.md")


@app.command("review")
def review(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="a calibration or synth run directory"),
    web: bool = typer.Option(False, help="serve the local review page instead of the terminal UI"),
    host: str = typer.Option("127.0.0.1", metavar="HOST"),
    port: int = typer.Option(8765, min=1, max=65535, metavar="PORT"),
    reviewer: str = typer.Option("human", metavar="NAME", help="name stored with each review"),
) -> None:
    """Accept or overrule judge grades; metrics and judge-human agreement are recomputed."""
    from k2lab.evals import review as review_mod
    from k2lab.runs import read_json

    run_json = Path(run_dir) / "run.json"
    if run_json.exists() and read_json(run_json).get("kind") == "synth":  # review judged synthetic trajectories
        from k2lab.synth import review as synth_review
        return synth_review.main(run_dir, web, host, port, reviewer)

    review_mod.main(run_dir, web, host, port, reviewer)


# ---- agentic data synthesis (issue 14) ----
@app.command()
def synth(out: Path = typer.Option(..., help="run directory: kept.jsonl, rejected.jsonl, queue.jsonl, card.md"),
          domains: str = typer.Option("embedded", help="'embedded' or a comma list of embedded domains"),
          tasks: int = typer.Option(500, help="embedded: number of tasks (trajectories) to synthesize"),
          seed: int = typer.Option(0, help="fixes the tasks and the injected tool failures"),
          fault_rate: float = typer.Option(0.15, help="share of tool calls that fail transiently first"),
          resume: bool = typer.Option(False, help="continue OUT, playing only tasks that have no record"),
          teacher: str = typer.Option("rule-based", help="embedded: 'rule-based' (the solver) or 'llm' (--model "
                                                         "over the OpenAI API; kept = tasks it solved)"),
          categories: str = typer.Option("", help="LLM path: comma list of tool categories to evolve tools from"),
          mcp: list[str] = typer.Option([], help="LLM path: MCP server (URL or command line) whose tools are used"),
          tools_file: list[str] = typer.Option([], help="LLM path: OpenAI-format JSON file of tool definitions"),
          tasks_per_agent: int = typer.Option(4, help="LLM path: tasks the task writer writes per agent"),
          model: str = typer.Option(None, help="LLM path: teacher/simulator model (default K2LAB_MODEL, else "
                                               "the endpoint's only model)"),
          judge_model: list[str] = typer.Option([], help="LLM path: judge model; repeat for judges that vote"),
          base_url: str = typer.Option(None, help="LLM path: endpoint (default K2LAB_BASE_URL)"),
          concurrency: int = typer.Option(8, help="LLM path: trajectories in flight"),
          price_per_mtok: str = typer.Option("0,0", help="LLM path: USD per million input,output tokens")) -> None:
    """Synthesize agentic trajectories: offline on the embedded domains (rule-based solver), or with an LLM
    over the OpenAI API when --categories, --mcp or --tools-file is given."""
    from k2lab.runs import RunDirError
    from k2lab.synth.pipeline import run_embedded
    from k2lab.synth.specs import SpecError

    try:
        if categories or mcp or tools_file:
            from k2lab.synth.stages import main as run_llm
            try:
                price = tuple(float(x) for x in price_per_mtok.split(","))
            except ValueError:
                price = ()
            if len(price) != 2:
                raise ValueError(f"--price-per-mtok: expected 'IN,OUT' in USD per million tokens, got {price_per_mtok!r}")
            card = run_llm(out, base_url, None, model, judge_model, mcp, tools_file,
                           [c.strip() for c in categories.split(",") if c.strip()], tasks_per_agent, concurrency,
                           fault_rate, seed, resume, price_per_mtok=price)
        elif teacher in ("rule-based", "llm"):
            from k2lab.agents.llm import LLM
            llm = LLM(base_url, None, model, max_concurrency=concurrency) if teacher == "llm" else None
            card = run_embedded(domains, tasks, out, seed, fault_rate, resume, llm, concurrency)
        else:
            raise ValueError(f"--teacher must be 'rule-based' or 'llm', got {teacher!r}")
    except (ValueError, RunDirError, SpecError) as e:
        raise typer.BadParameter(str(e)) from None
    t = card["totals"]
    typer.echo(f"kept {t['kept']} / {t['trajectories']} (rejected {t['rejected']}, for review {t['queued']}) "
               f"-> {out}/kept.jsonl, {out}/card.md")


# ---- serving (issue 6) ----
@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="checkpoint directory (weights + tokenizer files)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port"),
    api_key: str = typer.Option(None, "--api-key", envvar="K2LAB_API_KEY", help="require `Authorization: Bearer KEY`"),
    max_len: int = typer.Option(4096, help="tokens per request (prompt + output)"),
    cache_mb: int = typer.Option(512, help="latent-cache budget in MiB (slots = budget / (max_len x bytes per token))"),
    max_slots: int = typer.Option(64, help="most concurrent requests"),
    model_name: str = typer.Option(None, help="served model id (default: the checkpoint directory name)"),
    drain_timeout: float = typer.Option(30.0, min=0, help="seconds in-flight requests get to finish after SIGTERM "
                                                          "before they are aborted"),
    logprobs_mode: str = typer.Option("raw_logprobs", help="raw_logprobs (the model's distribution) or "
                                      "processed_logprobs (the one sampled from, for RL rollouts), as vLLM's"),
    default_chat_template_kwargs: str = typer.Option(
        None, help='JSON object of chat_template_kwargs every request gets unless it sets them, as vLLM\'s, e.g. '
                   '\'{"thinking": false}\' for a model trained with thinking off (k2lab sft and make run train so)'),
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (chat, completions, responses, tools, streaming)."""
    from k2lab.serve.server import build_server, run

    def build():
        import json

        try:
            defaults = json.loads(default_chat_template_kwargs) if default_chat_template_kwargs else None
        except ValueError as e:
            raise ValueError(f"--default-chat-template-kwargs is not JSON ({e}); "
                             "e.g. '{\"thinking\": false}'") from None
        if defaults is not None and not isinstance(defaults, dict):
            raise ValueError("--default-chat-template-kwargs takes a JSON object, e.g. '{\"thinking\": false}'")
        return build_server(checkpoint, api_key, max_len, cache_mb, max_slots, model_name, drain_timeout,
                            logprobs_mode, defaults)

    server = _user_errors(build)
    run(server, host, port)


# ---- INT4 (issue 5) ----
@app.command()
def qat(checkpoint: str = typer.Option(..., help="full-precision checkpoint directory"),
        run_dir: str = typer.Option(..., help="run directory (metrics, checkpoints, INT4 export); a rerun resumes"),
        max_steps: int = typer.Option(..., help="total QAT steps"),
        lr: float = typer.Option(3e-4, help="peak learning rate"),
        batch: int = typer.Option(8, help="sequences per step"),
        seq_len: int = typer.Option(256, help="tokens per sequence")) -> None:
    """INT4 quantization-aware training of the routed experts (the training loop in QAT mode, AdamW); writes
    RUN_DIR/checkpoint (compressed-tensors)."""
    from k2lab.train.qat import qat as run

    typer.echo(_user_errors(lambda: run(checkpoint, run_dir, max_steps, lr, batch, seq_len)))


@app.command()
def quantize(checkpoint: str = typer.Option(..., metavar="DIR", help="full-precision checkpoint directory"),
             out: str = typer.Option(..., metavar="DIR", help="output directory for the INT4 checkpoint")) -> None:
    """Post-training INT4 quantization of the routed experts (compressed-tensors pack-quantized)."""
    from k2lab.report import quantize_summary

    typer.echo(_user_errors(lambda: quantize_summary(checkpoint, out)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
