"""INT4 experts vs bf16 / fp32 on CPU: resident expert bytes on a loaded model, decode tokens/s, expert matmul.

1. Memory: a `tiny` checkpoint is quantized (`k2lab quantize`) and loaded with `k2lab.load_model`; the bytes
   its routed experts occupy are compared with the same experts of the bf16 model (also loaded from disk).
2. Decode: greedy generation, batch 1, fp32 / bf16 / INT4 experts (+ fp32 rest) / INT4 experts (+ bf16 rest),
   eager, alternating every round, and fp32 through the compiled decode step (INT4 experts cannot take it).
3. One K2-sized expert projection (2048 x 7168, one token, as in decode): fp32 and bf16 F.linear, torch's CPU
   INT4 kernel from packed weights (what Int4Experts uses), and unpack + dequantize + matmul (the alternative).

Medians of repeated runs, on a CPU shared with other jobs (timings are noisy; ratios are taken within one run).
    python bench/int4.py        # writes bench/results/int4.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import k2lab  # noqa: E402
from k2lab.config import ModelConfig  # noqa: E402
from k2lab.model import Experts, K2ForCausalLM  # noqa: E402
from k2lab.quant import int4  # noqa: E402
from k2lab.quant.experts import Int4Experts  # noqa: E402
from k2lab.train.qat import quantize  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "int4.json"


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def expert_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, weights) of the routed experts as they sit in memory."""
    total, weights = 0, 0
    for m in model.modules():
        if isinstance(m, Int4Experts):
            total += m.weight_bytes()
            weights += sum(m.n_experts * n * k for n, k in m.shapes.values())
        elif isinstance(m, Experts):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
            weights += sum(p.numel() for p in m.parameters())
    return total, weights


def decode_tokens_per_s(runs: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Greedy decode tokens/s of each (model, compile) in runs, alternating between them every round; medians."""
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in runs}
    with torch.no_grad():
        for r in range(repeats + 1):  # round 0 warms up (and compiles)
            for name, (model, compile) in runs.items():
                t = time.perf_counter()
                model.generate(prompt, new_tokens, compile=compile)
                if r:
                    times[name].append(time.perf_counter() - t)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


def expert_matmul(repeats: int) -> dict:
    torch.manual_seed(0)
    n, k = 2048, 7168  # one K2 expert's gate_proj
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, k)
    m = Int4Experts.from_weights(w[None], w[None], w.T[None])
    q, scale = int4.quantize(w)
    packed = int4.pack(q)
    wb, xb = w.bfloat16(), x.bfloat16()
    us = {
        "fp32_linear": median_time(lambda: F.linear(x, w), repeats),
        "bf16_linear": median_time(lambda: F.linear(xb, wb), repeats),
        "int4_kernel": median_time(lambda: m._linear(xb, "gate_proj", 0), repeats),
        "unpack_dequant_linear": median_time(lambda: F.linear(x, int4.dequantize(int4.unpack(packed), scale)),
                                             max(3, repeats // 4)),
    }
    return {"shape": [n, k], "tokens": 1, "median_us": {key: v * 1e6 for key, v in us.items()},
            "int4_over_bf16_speedup": us["bf16_linear"] / us["int4_kernel"],
            "int4_over_fp32_speedup": us["fp32_linear"] / us["int4_kernel"],
            "int4_over_dequant_speedup": us["unpack_dequant_linear"] / us["int4_kernel"]}


def main() -> None:
    torch.set_num_threads(1)  # on a shared CPU one thread avoids OpenMP spin-waiting; see README
    preset, new_tokens, repeats = "tiny", 64, 5
    results: dict = {"preset": preset, "threads": 1, "machine": "shared CPU, other jobs running: noisy"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = K2ForCausalLM(ModelConfig.preset(preset))
        model.init_weights(seed=0)
        k2lab.save_model(model, tmp / "fp")
        quantize(tmp / "fp", tmp / "int4")
        models = {"fp32": k2lab.load_model(tmp / "fp", dtype=torch.float32),
                  "bf16": k2lab.load_model(tmp / "fp", dtype=torch.bfloat16),
                  "int4": k2lab.load_model(tmp / "int4", dtype=torch.float32),
                  "int4_bf16_rest": k2lab.load_model(tmp / "int4", dtype=torch.bfloat16)}
        b16, n16 = expert_bytes(models["bf16"])
        b4, n4 = expert_bytes(models["int4"])
        assert n16 == n4
        results["memory"] = {"expert_weights": n4, "bf16_expert_bytes": b16, "int4_expert_bytes": b4,
                             "ratio_int4_over_bf16": b4 / b16, "int4_bits_per_weight": 8 * b4 / n4,
                             "checkpoint_bytes": {k: sum(f.stat().st_size for f in (tmp / k).glob("*.safetensors"))
                                                  for k in ("fp", "int4")}}
        print(f"experts: bf16 {b16} B, INT4 {b4} B -> {b4 / b16:.4f}x ({8 * b4 / n4:.2f} bits/weight)")
        # INT4 experts decode eagerly (the compiled step needs full-precision experts): against fp32 both ways
        runs = {**{name: (m, False) for name, m in models.items()}, "fp32_compiled": (models["fp32"], True)}
        results["load_average_1_5_15_at_start"] = os.getloadavg()
        tps = decode_tokens_per_s(runs, new_tokens, repeats)
        results["load_average_1_5_15_at_end"] = os.getloadavg()
        for name, rate in tps.items():
            print(f"decode {name}: {rate:.1f} tokens/s", flush=True)
        results["decode"] = {"new_tokens": new_tokens, "batch": 1, "repeats": repeats, "tokens_per_s": tps,
                             "alternating": True, "int4_over_bf16": tps["int4"] / tps["bf16"],
                             "int4_bf16_rest_over_bf16": tps["int4_bf16_rest"] / tps["bf16"],
                             "int4_over_fp32": tps["int4"] / tps["fp32"],
                             "int4_over_fp32_compiled": tps["int4"] / tps["fp32_compiled"]}
    results["k2_expert_matmul"] = expert_matmul(repeats=20)
    print(json.dumps(results["k2_expert_matmul"], indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = OUT.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(results, indent=1))
    os.replace(tmp_file, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
