"""Decode speed: compiled k2lab vs eager k2lab vs transformers on the same config and weights, at 2K context
(batch 1 and 8) and long context (8K and 32K, batch 1 and 4), with the chunked prefill that gets there.

Each (context, batch) point prefills once for k2lab and once for transformers (chunked, `--chunk` tokens; timed
once), then decodes `steps` greedy tokens from that context several times, the three implementations
alternating so that load from elsewhere hits all alike; medians. Each decode run rewinds to the prompt (k2lab overwrites the same
cache positions, transformers' cache is cropped back). The compiled decoder's first call (compile, or load
from inductor's cache under ~/.cache/k2lab/inductor) is reported as compile seconds, not timed.

    python bench/decode.py [--preset tiny] [--repeats 5] [--quick]

Writes bench/results/decode.json and bench/results/decode.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import k2lab  # noqa: E402
from k2lab.config import ModelConfig  # noqa: E402
from k2lab.model import K2ForCausalLM  # noqa: E402
from k2lab.model.decode import Decoder  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORIGINAL_CONTEXT = 1024  # YaRN's original context; factor = max_position_embeddings / this, as transformers reads it


class K2Run:
    """k2lab at one (batch, context): the model's eager cached forward, or a compiled Decoder whose cache is
    copied from an eager run's prefill (the same chunked eager forward Decoder.prefill runs; done once)."""

    def __init__(self, model, ids, steps: int, chunk: int, prefilled: "K2Run | None" = None):
        self.model, self.steps, self.compile = model, steps, prefilled is not None
        self.batch, self.context = ids.shape
        start = time.perf_counter()
        with torch.no_grad():
            if self.compile:
                self.decoder = Decoder(model, self.batch, self.context + steps, prefill_chunk=chunk)
                for kv, eager in zip(self.decoder.cache, prefilled.cache.kv):
                    kv.copy_(eager)
            else:
                self.cache = model.new_cache(self.batch, self.context + steps)
                for a in range(0, self.context, chunk):
                    b = min(self.context, a + chunk)
                    model(ids[:, a:b], positions=torch.arange(a, b)[None].expand(self.batch, -1), cache=self.cache)
        self.prefill_seconds = time.perf_counter() - start
        self.first = ids[:, -1]

    def __call__(self) -> float:
        tok = self.first
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(self.steps):
                pos = torch.full((self.batch,), self.context + i)
                if self.compile:
                    logits = self.decoder.step(tok, pos)
                else:
                    logits = self.model(tok[:, None], positions=pos[:, None], cache=self.cache)[:, -1]
                tok = logits.argmax(-1)
        return time.perf_counter() - start


class HFRun:
    """transformers at one (batch, context): DynamicCache, chunked prefill, cropped back after each run."""

    def __init__(self, hf, ids, steps: int, chunk: int):
        from transformers import DynamicCache

        self.hf, self.steps, self.context = hf, steps, ids.shape[1]
        self.cache = DynamicCache(config=hf.config)
        start = time.perf_counter()
        with torch.no_grad():
            for a in range(0, self.context, chunk):
                hf(ids[:, a:a + chunk], past_key_values=self.cache, use_cache=True)
        self.prefill_seconds = time.perf_counter() - start
        self.first = ids[:, -1:]

    def __call__(self) -> float:
        self.cache.crop(-(self.cache.get_seq_length() - self.context))  # a negative count: tokens to drop
        tok = self.first
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(self.steps):
                tok = self.hf(tok, past_key_values=self.cache, use_cache=True).logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def alternating(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per run function, calling them in turn `repeats` times after one warm-up each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def measure(model, hf, batch: int, context: int, steps: int, chunk: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    eager = K2Run(model, ids, steps, chunk)
    runs = {"compiled": K2Run(model, ids, steps, chunk, prefilled=eager), "eager": eager}
    point = {"batch": batch, "context": context, "steps": steps}
    try:
        runs["transformers"] = HFRun(hf, ids, steps, chunk)
    except (RuntimeError, MemoryError) as e:  # its failure mode is the result at this length
        point["transformers_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    seconds = alternating(runs, repeats)
    point["compile_seconds"] = runs["compiled"].decoder.compile_seconds
    point["prefill_tokens_per_s"] = {name: batch * context / runs[name].prefill_seconds
                                     for name in ("eager", "transformers") if name in runs}
    point["decode_tokens_per_s"] = {name: batch * steps / s for name, s in seconds.items()}
    tps = point["decode_tokens_per_s"]
    if "transformers" in tps:
        point["ratio_vs_transformers"] = {name: tps[name] / tps["transformers"] for name in ("compiled", "eager")}
    point["compiled_vs_eager"] = tps["compiled"] / tps["eager"]
    print(json.dumps(point), flush=True)
    return point


def table(points: list[dict]) -> str:
    lines = ["| context | batch | compiled k2lab tok/s | eager k2lab tok/s | transformers tok/s | compiled / tf "
             "| eager / tf | compiled / eager | compile s | prefill tok/s k2lab / tf |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        tps, pre = p["decode_tokens_per_s"], p["prefill_tokens_per_s"]
        ratio = p.get("ratio_vs_transformers")
        tf = f"{tps['transformers']:,.1f}" if ratio else p["transformers_error"]
        lines.append(
            f"| {p['context']:,} | {p['batch']} | {tps['compiled']:,.1f} | {tps['eager']:,.1f} | {tf} | "
            + (f"{ratio['compiled']:.2f}x | {ratio['eager']:.2f}x" if ratio else "- | -")
            + f" | {p['compiled_vs_eager']:.2f}x | {p['compile_seconds']:.1f} | {pre['eager']:,.0f} / "
            + (f"{pre['transformers']:,.0f}" if "transformers" in pre else "-") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    parser.add_argument("--quick", action="store_true", help="short contexts, for a smoke run")
    parser.add_argument("--only", choices=["short", "long"], help="run only the 2K points or only 8K/32K")
    parser.add_argument("--long", default="8192,32768", help="the long contexts, comma-separated")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    # (context, batch, steps, repeats): fewer steps and repeats where transformers takes seconds per token
    short = [(2048, 1, 64, args.repeats), (2048, 8, 64, args.repeats)]  # bench/model.py's decode shapes
    long = [(c, b, 16, max(3, args.repeats // 2)) for c in map(int, args.long.split(",")) for b in (1, 4)]
    if args.quick:
        short, long = [(256, 1, 8, 2), (256, 8, 8, 2)], [(1024, 1, 8, 2), (1024, 4, 8, 2)]
    grid = {"short": short, "long": long}.get(args.only, short + long)
    max_pos = 1 << (max(c + s for c, _, s, _ in short + long) - 1).bit_length()  # one config for every --only
    base = ModelConfig.preset(args.preset)
    rope = {**base.rope_scaling, "factor": max_pos / ORIGINAL_CONTEXT,
            "original_max_position_embeddings": ORIGINAL_CONTEXT}
    config = dataclasses.replace(base, max_position_embeddings=max_pos, rope_scaling=rope)
    torch.manual_seed(0)
    model = K2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        k2lab.save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    load_before = os.getloadavg()
    points = [measure(model, hf, b, c, s, args.chunk, r) for c, b, s, r in grid]
    load = {"before": load_before, "after": os.getloadavg()}
    result = {"load_average_1_5_15": load, "preset": args.preset, "quick": args.quick,
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "prefill_chunk": args.chunk, "max_position_embeddings": max_pos, "points": points}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "decode" + (f"_{args.only}" if args.only else "") + ("_quick" if args.quick else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    note = (f"`python bench/decode.py{' --only ' + args.only if args.only else ''}`, `{args.preset}`, "
            f"{torch.get_num_threads()} threads, load average {load['before'][0]:.1f} -> {load['after'][0]:.1f} "
            f"on {os.cpu_count()} CPUs (shared machine: ratios from alternating runs, medians)\n\n")
    (RESULTS / f"{name}.md").write_text(note + table(points))
    print(note + table(points))


if __name__ == "__main__":
    main()
