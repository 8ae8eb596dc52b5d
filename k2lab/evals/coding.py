"""Coding eval: sample solutions from a model, run each against the problem's unit tests in the sandbox.

A problem is one JSONL line: `id`, `prompt` (the task), `tests` (Python that exercises the solution with
asserts; it runs after the solution in the same program, and the sample passes when the program gets through
the tests and exits 0).
Samples run in `k2lab.agents.sandbox.Sandbox` (own process and workspace, CPU, memory, output and wall-clock
limits, no network). pass@k is the unbiased estimator over n samples per problem, averaged over problems.
`resume=True` keeps every sample already run.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from k2lab.agents.llm import EndpointError
from k2lab.agents.sandbox import Limits, Sandbox
from k2lab.evals import report
from k2lab.evals.stats import pass_at_k
from k2lab.evals.store import ON_ERROR, Dataset, open_run, read_dataset, require, snapshot
from k2lab.runs import append_jsonl, read_jsonl, write_json

SEED_DATASET = Path(__file__).parent / "data" / "coding.jsonl"

SYSTEM_PROMPT = """\
You write correct, self-contained Python 3 using only the standard library. Reply with the complete solution
in one ```python code block. Do not include tests or example usage."""

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def check_row(row: dict) -> None:
    require(row, {"id": str, "prompt": str, "tests": str})


def load_dataset(path: str | Path, on_error: str = "stop") -> Dataset:
    data = read_dataset(path, check_row, on_error)
    ids = [r["id"] for r in data.rows]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"{path}: duplicate problem ids {dup}")
    return data


def extract_code(reply: str) -> str:
    """The last fenced code block of a reply, or the whole reply when it has none."""
    blocks = _FENCE.findall(reply or "")
    return (blocks[-1] if blocks else reply or "").strip()


async def run_tests(sandbox: Sandbox, code: str, tests: str, limits: Limits) -> dict:
    """Solution then tests in one program; it passes when it exits 0 having printed a fresh nonce after the
    tests, so a solution that ends the program early (sys.exit(0), os._exit(0)) does not pass."""
    nonce = secrets.token_hex(8)
    res = await sandbox.python(f"{code}\n\n{tests}\n\nprint('tests-passed-{nonce}')\n", limits)
    passed = res.ok and f"tests-passed-{nonce}" in res.stdout[-200:]
    outcome = "ended_early" if res.ok and not passed else res.outcome
    return {"passed": passed, "outcome": outcome, "exit_code": res.exit_code,
            "stderr": res.stderr[-2000:], "wall_s": round(res.wall_s, 3)}


@dataclass
class CodingSettings:
    """`k2lab eval coding`. Endpoint, key and model default to K2LAB_* / OPENAI_* (agents/llm.py)."""

    dataset: str | None = None  # JSONL of id, prompt, tests; None: the shipped set
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    run_dir: str = "runs/eval-coding"
    n: int = 1  # samples per problem
    ks: tuple[int, ...] = (1,)  # pass@k for each k
    temperature: float = 0.0
    max_tokens: int = 1024  # cap on each solution
    limits: Limits = Limits(cpu_s=10, wall_s=20, memory_mb=1024)  # per test program
    max_parallel_runs: int = 4  # test programs at once (CPU-bound, bounded apart from requests)
    resume: bool = False
    on_error: str = "stop"
    concurrency: int = 8

    def __post_init__(self) -> None:
        self.ks = tuple(self.ks)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.n < 1 or not self.ks or any(not 1 <= k <= self.n for k in self.ks):
            raise ValueError(f"need n >= 1 and every k in 1..n, got n={self.n}, ks={self.ks}")
        if min(self.concurrency, self.max_tokens, self.max_parallel_runs) < 1:
            raise ValueError("concurrency, max_tokens and max_parallel_runs must be >= 1")


async def run_coding(model, s: CodingSettings) -> dict:
    """n samples per problem from `model` (an LLM), each tested in the sandbox; pass@k for each k <= n."""
    dataset = s.dataset or SEED_DATASET
    run_dir = Path(s.run_dir)
    log = run_dir / "samples.jsonl"
    open_run(run_dir, "coding", s.resume, model.model)
    data = load_dataset(dataset, s.on_error)
    snapshot(run_dir, data.rows)
    write_json(run_dir / "config.json", {"eval": "coding", "dataset": str(dataset), "model": model.model,
                                         "n": s.n, "ks": list(s.ks), "temperature": s.temperature,
                                         "max_tokens": s.max_tokens, "skipped_rows": data.skipped})
    done = {(x["id"], x["sample"]) for x in read_jsonl(log)}
    todo = [(row, i) for row in data.rows for i in range(s.n) if (row["id"], i) not in done]
    runs = asyncio.Semaphore(s.max_parallel_runs)
    bar = tqdm(total=len(todo), desc="coding", unit="sample")

    async def one(row: dict, i: int) -> None:
        try:
            res = await model.chat([{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": row["prompt"]}], temperature=s.temperature,
                                   max_tokens=s.max_tokens)
        except EndpointError:  # nothing answers: every sample would fail the same way
            raise
        except Exception as e:  # failed past the client's retries: not logged, so --resume samples it again
            append_jsonl(run_dir / "errors.jsonl", {"id": row["id"], "sample": i, "error": f"{type(e).__name__}: {e}"})
            bar.update(1)
            return
        code = extract_code(res.message.get("content") or "")
        workspace = run_dir / "work" / f"{row['id']}-{i}"
        async with runs:
            outcome = await run_tests(Sandbox(workspace, s.limits), code, row["tests"], s.limits)
        shutil.rmtree(workspace, ignore_errors=True)
        append_jsonl(log, {"id": row["id"], "sample": i, "code": code, **outcome})
        bar.update(1)

    try:
        await asyncio.gather(*(one(row, i) for row, i in todo))
    finally:
        bar.close()
    return finalize(run_dir)


def finalize(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    config = report.read_config(run_dir)
    rows = read_jsonl(run_dir / "dataset.jsonl")
    samples: dict[str, dict[int, dict]] = {}
    for s in read_jsonl(run_dir / "samples.jsonl"):
        samples.setdefault(s["id"], {})[s["sample"]] = s
    per_problem = []
    for row in rows:
        got = list(samples.get(row["id"], {}).values())
        per_problem.append({"id": row["id"], "n": len(got), "c": sum(s["passed"] for s in got),
                            "outcomes": dict(Counter(s["outcome"] for s in got))})
    complete = [p for p in per_problem if p["n"] == config["n"]]  # pass@k needs all n samples of a problem
    results = {"eval": "coding", "model": config["model"], "problems": len(complete),
               "incomplete": [p["id"] for p in per_problem if p["n"] < config["n"]],
               "samples_per_problem": config["n"], "temperature": config["temperature"],
               "pass_at_k": {str(k): (sum(pass_at_k(p["n"], p["c"], k) for p in complete) / len(complete)
                                      if complete else None) for k in config["ks"]},
               "per_problem": per_problem, "skipped_rows": config["skipped_rows"]}
    write_json(run_dir / "results.json", results)
    report.coding_report(run_dir, results)
    return results


def main(s: CodingSettings) -> dict:
    """`k2lab eval coding`."""
    from k2lab.agents.llm import LLM

    llm = LLM(base_url=s.base_url, api_key=s.api_key, model=s.model, max_concurrency=s.concurrency)

    async def go() -> dict:
        try:
            return await run_coding(llm, s)
        finally:
            await llm.aclose()
    return asyncio.run(go())
