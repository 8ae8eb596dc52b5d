"""RL rollout throughput on this machine: completion tokens/s of the in-process batch API
(k2lab.serve.rollout.InProcessGenerator) on the compiled decode step, and on the eager forward, vs a Python loop
over eager `model.generate` (one call per sample) and vs
transformers' `generate(num_return_sequences=K)` on the same weights (the k2lab checkpoint loaded as
DeepseekV3ForCausalLM), all sampling at temperature 1 (no top-k, no top-p).

    python bench/rollout.py [--preset tiny] [--prompts 16] [--k 8] [--new-tokens 128] [--repeats 3] [--quick]

Random weights, fp32, prompts of one length (so transformers needs no padding: its best case, one batch of
prompts x K rows), and no stop ids, so every method generates exactly prompts x K x new-tokens tokens (checked).
Runs alternate between the methods so load from elsewhere on the shared machine hits all alike; medians; the
load average is recorded. The compiled generator's first call (compile, or load from inductor's cache, plus
one call) is recorded, not timed. Writes bench/results/rollout.json and rollout.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import k2lab
from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.runs import write_atomic, write_json
from k2lab.serve.rollout import InProcessGenerator, RolloutParams

RESULTS = Path(__file__).parent / "results"


def timed(fn) -> tuple[float, int]:
    """Seconds and completion tokens of one call of fn (which returns its token count)."""
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: the 2-core machine is shared with other jobs)")
    ap.add_argument("--quick", action="store_true", help="4 prompts x 2 samples x 16 tokens, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.k, args.new_tokens, args.repeats = 4, 2, 16, 1
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset)
    model = K2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        k2lab.save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompts = torch.randint(0, config.vocab_size, (args.prompts, args.prompt_len),
                            generator=torch.Generator().manual_seed(1))
    n, new = args.prompts * args.k, args.new_tokens
    # no EOS ids: every sample runs to new_tokens, as the others do
    generators = {c: InProcessGenerator(model, compile=c) for c in (True, False)}

    def rollout(compiled: bool) -> int:
        out = generators[compiled].generate(prompts.tolist(), args.k,
                                            RolloutParams(max_new_tokens=new, temperature=1.0))
        return sum(len(s.completion_ids) for s in out)

    def ours() -> int:
        return rollout(True)

    def ours_eager() -> int:
        return rollout(False)

    def loop() -> int:
        total = 0
        for i in range(n):
            p = prompts[i // args.k: i // args.k + 1]
            total += model.generate(p, new, temperature=1.0, seed=i).shape[1] - args.prompt_len
        return total

    def transformers() -> int:
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, num_return_sequences=args.k, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=config.pad_token_id)
        return out.shape[0] * (out.shape[1] - args.prompt_len)

    methods = {"rollout API": ours, "rollout API, eager": ours_eager, "loop over model.generate": loop,
               "transformers generate(num_return_sequences)": transformers}
    load_before = os.getloadavg()
    compile_seconds = timed(ours)[0]  # warm-up: the compile (or inductor cache load) and one call
    for fn in (ours_eager, transformers):  # warm-up (the loop warms itself: 128 calls)
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, fn in methods.items():
            t, tokens = timed(fn)
            if tokens != n * new:
                raise SystemExit(f"{name} produced {tokens} tokens, expected {n * new}")
            seconds[name].append(t)
            print(f"round {r + 1}: {name:<44} {t:7.2f} s  {tokens / t:9.1f} tokens/s", flush=True)
    load_after = os.getloadavg()

    rate = {name: n * new / statistics.median(ts) for name, ts in seconds.items()}
    base = rate["rollout API"]
    rows = [{"method": name, "tokens_per_s": rate[name], "median_s": statistics.median(seconds[name]),
             "seconds": seconds[name], "rollout_api_speedup": base / rate[name]} for name in methods]
    result = {"preset": args.preset, "prompts": args.prompts, "k": args.k, "new_tokens": new,
              "prompt_len": args.prompt_len, "temperature": 1.0, "first_compiled_call_s": compile_seconds,
              "repeats": args.repeats, "quick": args.quick,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_1_5_15": {"before": load_before, "after": load_after},
              "note": "shared, loaded CPU (see load average): absolute rates are noisy, ratios come from "
                      "alternating runs", "rows": rows}
    table = [f"{args.prompts} prompts x {args.k} samples x {new} new tokens, `{args.preset}`, temperature 1, "
             f"{torch.get_num_threads()} thread(s), load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
             f"on {os.cpu_count()} CPUs; medians of {args.repeats} alternating runs", "",
             "| method | completion tokens/s | rollout API speed-up |", "|---|---:|---:|"]
    table += [f"| {r['method']} | {r['tokens_per_s']:,.0f} | {r['rollout_api_speedup']:.2f}x |" for r in rows]
    print("\n".join(table))
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS / "rollout.json", result)
        write_atomic(RESULTS / "rollout.md", "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
