"""Does compiling the rollout decode pay at the RL recipe's sizes? Compile seconds (cold: an empty inductor
cache; warm: a second process on the cache the first left) against the seconds each rollout call saves.

    python bench/compile_cost.py [--preset tiny] [--prompts 2] [--k 4] [--new-tokens 48] [--repeats 3]

The defaults are `k2lab rl`'s: batch 8 = 2 prompts x 4 samples, 48 new tokens per turn (prompts of 96 tokens,
temperature 1, no stop ids, so every call decodes the same tokens). Each process builds the model (random
weights, seed 0), makes one compiled call (compile, or load from the cache, plus one call: the compile
seconds are the Decoder's own count), then alternates eager and compiled calls of the rollout API; medians.
Break-even = compile seconds / seconds saved per call. Writes bench/results/compile_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def child(args) -> dict:
    from k2lab.config import ModelConfig
    from k2lab.model import K2ForCausalLM
    from k2lab.serve.rollout import InProcessGenerator, RolloutParams

    torch.manual_seed(0)
    model = K2ForCausalLM(ModelConfig.preset(args.preset)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()
    params = RolloutParams(max_new_tokens=args.new_tokens, temperature=1.0)
    fast, eager = InProcessGenerator(model, compile=True), InProcessGenerator(model, compile=False)

    def timed(gen) -> float:
        start = time.perf_counter()
        gen.generate(prompts, args.k, params)
        return time.perf_counter() - start

    first = timed(fast)
    compile_seconds = model.compiled_decoders[next(iter(model.compiled_decoders))].compile_seconds
    seconds = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        seconds["eager"].append(timed(eager))
        seconds["compiled"].append(timed(fast))
    return {"first_call_s": first, "compile_s": compile_seconds, "seconds": seconds,
            "eager_s": statistics.median(seconds["eager"]), "compiled_s": statistics.median(seconds["compiled"]),
            "load_average": os.getloadavg(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("cold", "warm"):  # the second process finds what the first compiled
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                  os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs[phase] = r = json.loads(out.strip().splitlines()[-1])
            r["saved_per_call_s"] = r["eager_s"] - r["compiled_s"]
            r["break_even_calls"] = r["compile_s"] / r["saved_per_call_s"] if r["saved_per_call_s"] > 0 else None
            print(phase, json.dumps(r), flush=True)
    setup = {k: getattr(args, k) for k in ("preset", "prompts", "k", "new_tokens", "prompt_len", "repeats")}
    lines = [f"Rollout calls of {args.prompts} prompts x {args.k} samples x {args.new_tokens} tokens "
             f"(prompts {args.prompt_len} tokens), `{args.preset}`, random weights; medians of {args.repeats} "
             f"alternating calls per process", "",
             "| inductor cache | compile s | eager call s | compiled call s | speed-up | calls to break even | "
             "load average (1 min) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for phase, r in runs.items():
        even = "never" if r["break_even_calls"] is None else f"{r['break_even_calls']:.1f}"
        lines.append(f"| {phase} | {r['compile_s']:.1f} | {r['eager_s']:.2f} | {r['compiled_s']:.2f} | "
                     f"{r['eager_s'] / r['compiled_s']:.2f}x | {even} | {r['load_average'][0]:.1f} |")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile_cost.json").write_text(json.dumps({"setup": setup, "runs": runs}, indent=1) + "\n")
    (RESULTS / "compile_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
