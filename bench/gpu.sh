#!/usr/bin/env bash
# The GPU check, for a CUDA machine (not run yet: no GPU was available where this was written).
#
#     bash bench/gpu.sh            # ~5-10 min on one GPU; writes bench/results/gpu.json
#
# On one GPU, in bf16, with random weights of the `small` preset (and `tiny` for the rollout API):
# - decode tokens/s at 2K and 8K context, batch 1 and 8: the model's eager cached forward against the compiled
#   static-shape step of k2lab.model.decode, which on CUDA compiles with mode="reduce-overhead" (CUDA graphs
#   replaying the step; the latent caches are static addresses) - the same Decoder generate, the engine and
#   the rollout API use; greedy tokens of the two paths compared;
# - the rollout API (InProcessGenerator) for 16 prompts x 8 samples x 128 tokens, compiled against eager;
# - compile seconds of each graph (inductor's cache under ~/.cache/k2lab/inductor is kept between runs).
# Medians of alternating runs. CPU-only machines: the script stops with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
"$PY" - "$@" <<'PY'
import json, platform, statistics, sys, time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh needs a CUDA GPU and a CUDA build of torch; none found")
from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.model.decode import Decoder
from k2lab.serve.rollout import InProcessGenerator, RolloutParams

dev, dtype, repeats, steps = torch.device("cuda"), torch.bfloat16, 5, 64
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
          "host": platform.node(), "decode": [], "rollout": None}


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


torch.manual_seed(0)
model = K2ForCausalLM(ModelConfig.preset("small")).to(dev, dtype).eval()
for context in (2048, 8192):
    for batch in (1, 8):
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
        eager_cache = model.new_cache(batch, context + steps)
        decoder = Decoder(model, batch, context + steps)
        with torch.no_grad():
            for start in range(0, context, 2048):  # the same chunked eager prefill into both caches
                pos = torch.arange(start, min(context, start + 2048), device=dev)[None].expand(batch, -1)
                first = model(ids[:, start:start + 2048], positions=pos, cache=eager_cache)[:, -1].argmax(-1)
            for kv, eager in zip(decoder.cache, eager_cache.kv):
                kv.copy_(eager)

        def run(compiled: bool):
            tok, out = first, []
            with torch.no_grad():
                for i in range(steps):
                    pos = torch.full((batch,), context + i, device=dev)
                    if compiled:
                        logits = decoder.step(tok, pos)
                    else:
                        logits = model(tok[:, None], positions=pos[:, None], cache=eager_cache)[:, -1]
                    tok = logits.argmax(-1)
                    out.append(tok)
            return torch.stack(out, 1)

        compile_s, _ = timed(lambda: run(True))  # compile (or cache load) + CUDA graph capture + one run
        times = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for name in times:
                t, toks = timed(lambda: run(name == "compiled"))
                times[name].append(t)
                result_tokens = toks if name == "eager" else result_tokens
                if name == "compiled":
                    same = torch.equal(toks, result_tokens)
        eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
        row = {"preset": "small", "context": context, "batch": batch, "steps": steps,
               "eager_tokens_per_s": batch * steps / eager_s, "compiled_tokens_per_s": batch * steps / compiled_s,
               "speedup": eager_s / compiled_s, "compile_s": compile_s, "greedy_identical": same}
        result["decode"].append(row)
        print(json.dumps(row), flush=True)
        del decoder, eager_cache
        torch.cuda.empty_cache()

torch.manual_seed(0)
tiny = K2ForCausalLM(ModelConfig.preset("tiny")).to(dev, dtype).eval()
prompts = torch.randint(0, tiny.config.vocab_size, (16, 64)).tolist()
params = RolloutParams(max_new_tokens=128, temperature=1.0)
gens = {"eager": InProcessGenerator(tiny, compile=False), "compiled": InProcessGenerator(tiny, compile=True)}
first_s, _ = timed(lambda: gens["compiled"].generate(prompts, 8, params))
times = {name: [] for name in gens}
for _ in range(3):
    for name, gen in gens.items():
        times[name].append(timed(lambda: gen.generate(prompts, 8, params))[0])
tokens = 16 * 8 * 128
result["rollout"] = {"preset": "tiny", "prompts": 16, "k": 8, "new_tokens": 128, "first_compiled_call_s": first_s,
                     **{f"{n}_tokens_per_s": tokens / statistics.median(t) for n, t in times.items()},
                     "speedup": statistics.median(times["eager"]) / statistics.median(times["compiled"])}
print(json.dumps(result["rollout"]), flush=True)
out = Path("bench/results/gpu.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"wrote {out}")
PY
