"""The training step (forward + backward) against this machine's GEMM rate, and against transformers.

In one process, alternating every round (so load from elsewhere hits all alike), medians over rounds:
- this machine's fp32 (and bf16) GEMM rate: torch.mm at the step's own shapes (the lm_head's and a square one);
  the higher median is the rate the step is held to;
- k2lab's step on the same batch: eager with the full head (logits + F.cross_entropy), eager with the chunked
  head (K2ForCausalLM.loss; and with token_gradients=True, as a loop weighting per-token losses would use it),
  the chunked step with the body torch.compile'd (compile time reported apart), and
  the chunked step in the compute dtype the start-up probe chose (k2lab.model.dtype) when that is not fp32;
- transformers' DeepseekV3ForCausalLM on the same weights (fp32, full head);
- the head alone (full vs chunked): time and its largest buffer;
- the optimizer step: Muon (batched Newton-Schulz) vs AdamW on the same gradients, and the Newton-Schulz FLOPs
  over the difference of the two steps (a GEMM rate: how efficiently Newton-Schulz runs).

Model FLOPs per token (the usual 6N accounting, counted from the config; recomputation is not counted):
    6 * (active matmul weights: every 2-D weight but the embedding, routed experts scaled by k/E)
  + 6 * L * H * (qk_head_dim + v_head_dim) * T/2     (scores and values over the causal half of T keys)
FLOP rate = FLOPs per token * tokens per step / step seconds; reported as a fraction of the GEMM rate.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 512] [--repeats 5] [--threads N] [--quick]

Writes bench/results/train_step.{json,md} (other presets: train_step_PRESET.*; --quick: *_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import k2lab
from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM, MoE
from k2lab.model.dtype import compute_dtype, gemm_gflops
from k2lab.model.loss import chunked_cross_entropy, default_chunk_size
from k2lab.optim.muon import build_optimizer

RESULTS = Path(__file__).parent / "results"


def flops_per_token(model: K2ForCausalLM, seq: int) -> dict:
    """Training FLOPs per token from the config (see the module docstring)."""
    c = model.config
    matmul = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "model.embed_tokens.weight":
            continue
        matmul += p.numel()
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            routed = sum(p.numel() for p in block.mlp.experts.parameters())
            matmul -= routed - routed * c.num_experts_per_tok // c.n_routed_experts
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq // 2
    return {"matmul_weights": matmul, "per_token": 6 * matmul + attention, "attention_per_token": attention}


def newton_schulz_gflop(opt, steps: int = 5) -> float:
    """FLOPs of one Muon step's Newton-Schulz: per matrix [A, B] with A <= B (it iterates on the wide side),
    each of `steps` iterations is X X^T (2A^2B), (X X^T)^2 (2A^3) and that times X (2A^2B)."""
    total = 0
    for group in opt.param_groups:
        if "ns_dtype" not in group:  # AdamW groups
            continue
        for p in group["params"]:
            a, b = sorted(p.shape[-2:])
            total += p.numel() // (a * b) * steps * (4 * a * a * b + 2 * a**3)
    return total / 1e9


class LargestBuffer(TorchDispatchMode):
    """The largest tensor any op allocates while active (forward and backward), in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:  # views and in-place results share an input's storage: no allocation
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def timed(fn, params):
    """A run function returning the seconds of one training step `fn()` (gradients cleared first)."""
    def run():
        for p in params:
            p.grad = None
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def alternate(runs: dict, repeats: int) -> dict:
    """{name: median of run()} with every run called once per round, in turn; one warm-up round."""
    out = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            value = run()
            if i:
                out[name].append(value)
        print(f"round {i}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in out.items() if v), flush=True)
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd step")
    parser.add_argument("--quick", action="store_true", help="2x128 tokens, 2 rounds: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 128, 2
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset)
    model = K2ForCausalLM(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        k2lab.save_model(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    tokens = args.batch * args.seq
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    dtype, dtype_report = compute_dtype("cpu", tokens, config.hidden_size)
    print(f"compute dtype: {dtype_report['dtype']} ({dtype_report['reason']}; {dtype_report['evidence']})")
    flops = flops_per_token(model, args.seq)
    step_flops = flops["per_token"] * tokens
    params, hf_params = list(model.parameters()), list(hf.parameters())
    d, v = config.hidden_size, config.vocab_size
    gemms = {"head": (tokens, d, v), "square": (2048, 2048, 2048)}

    def full_step():
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

    def chunked_step():
        model.loss(x, y)[0].backward()

    def token_grads_step():  # as a loop that weights per-token losses itself: the logits recomputed in backward
        model.loss(x, y, token_gradients=True)[1].mean().backward()

    def hf_step():
        F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).backward()

    def bf16_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(x, y)[0].backward()

    runs = {f"gemm_fp32_{k}": (lambda s=s: gemm_gflops(torch.float32, *s, torch.device("cpu"), repeats=3))
            for k, s in gemms.items()}
    runs.update(k2lab_full=timed(full_step, params), k2lab_chunked=timed(chunked_step, params),
                k2lab_chunked_token_grads=timed(token_grads_step, params), transformers=timed(hf_step, hf_params))
    compile_s = None
    if not args.no_compile:
        compiled_body = torch.compile(model.model)

        def compiled_step():
            chunked_cross_entropy(compiled_body(x), model.lm_head.weight, y)[0].backward()
        start = time.perf_counter()
        timed(compiled_step, params)()  # compiles forward and backward
        compile_s = time.perf_counter() - start
        runs["k2lab_chunked_compiled"] = timed(compiled_step, params)
    if dtype != torch.float32:
        runs["gemm_bf16_head"] = lambda: gemm_gflops(torch.bfloat16, *gemms["head"], torch.device("cpu"), repeats=3)
        runs["k2lab_chunked_bf16"] = timed(bf16_step, params)
    medians = alternate(runs, args.repeats)

    # the head alone: time and largest buffer, full vs chunked
    h = torch.randn(tokens, d, requires_grad=True)
    head_runs = {"head_full": timed(lambda: F.cross_entropy(model.lm_head(h), y.flatten()).backward(), [h] + params),
                 "head_chunked": timed(lambda: chunked_cross_entropy(h, model.lm_head.weight, y.flatten())[0]
                                       .backward(), [h] + params)}
    head = alternate(head_runs, args.repeats)
    for name, run in head_runs.items():
        with LargestBuffer() as mode:
            run()
        head[f"{name}_largest_mb"] = mode.largest / 2**20

    # optimizer step on the same gradients
    chunked_step()
    opts = {kind: build_optimizer(model, kind=kind, lr=1e-4) for kind in ("adamw", "muon")}
    if dtype != torch.float32:  # Newton-Schulz in the compute dtype too (Muon's default on CPU is fp32)
        opts["muon_bf16_ns"] = build_optimizer(model, kind="muon", lr=1e-4)
        for g in opts["muon_bf16_ns"].param_groups:
            if "ns_dtype" in g:
                g["ns_dtype"] = dtype

    def opt_run(opt):
        def run():
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start
        return run
    optim = alternate({f"{k}_step_s": opt_run(o) for k, o in opts.items()}, args.repeats)
    optim.update({f"{k}_over_adamw": optim[f"{k}_step_s"] / optim["adamw_step_s"] for k in opts if k != "adamw"})
    # Newton-Schulz is GEMM work: its FLOPs over the Muon step's extra time, against the GEMM rate
    optim["newton_schulz_gflop"] = newton_schulz_gflop(opts["muon"])
    optim["newton_schulz_gflops_fp32"] = optim["newton_schulz_gflop"] / (optim["muon_step_s"]
                                                                         - optim["adamw_step_s"])

    gemm_rate = max(medians[f"gemm_fp32_{k}"] for k in gemms)
    steps = [k for k in medians if k.startswith("k2lab") or k == "transformers"]
    fp32_steps = [k for k in steps if k != "k2lab_chunked_bf16" and k != "transformers"]
    best_fp32 = min(fp32_steps, key=lambda k: medians[k])
    rows = []
    for k in steps:
        rate = step_flops / medians[k] / 1e9
        ref_rate = medians["gemm_bf16_head"] if k == "k2lab_chunked_bf16" else gemm_rate
        rows.append({"step": k, "seconds": medians[k], "tokens_per_s": tokens / medians[k], "gflops": rate,
                     "fraction_of_gemm": rate / ref_rate, "vs_transformers": medians["transformers"] / medians[k]})
    load = os.getloadavg()
    result = {
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor(),
        "load_average_1_5_15_at_start": load_at_start, "load_average_1_5_15_at_end": load,
        "compute_dtype": dtype_report, "flops": flops,
        "step_gflop": step_flops / 1e9, "chunk_size": default_chunk_size(v), "compile_s": compile_s,
        "gemm_gflops": {k: medians[k] for k in medians if k.startswith("gemm")}, "gemm_rate_fp32": gemm_rate,
        "steps": rows, "best_fp32_step": best_fp32, "head": head, "optimizer": optim,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "train_step" if args.preset == "tiny" and not args.quick else f"train_step_{args.preset}" + (
        "_quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = [f"Training step fwd+bwd, `{args.preset}` {args.batch}x{args.seq}, {torch.get_num_threads()} threads, "
          f"load average (1 min) {load_at_start[0]:.1f} at start, {load[0]:.1f} at end. Model FLOPs "
          f"{flops['per_token'] / 1e6:.1f} M/token ({step_flops / 1e9:.1f} GFLOP/step). fp32 GEMM rate "
          f"{gemm_rate:.0f} GFLOP/s "
          f"(" + ", ".join(f"{k} {medians['gemm_fp32_' + k]:.0f}" for k in gemms) + "). Compute dtype chosen: "
          f"{dtype_report['dtype']} ({dtype_report['reason']}).", "",
          "| step | s | tokens/s | GFLOP/s | of GEMM rate | vs transformers |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['step']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {r['gflops']:.0f} | "
           f"{r['fraction_of_gemm']:.0%} | {r['vs_transformers']:.2f}x |" for r in rows]
    md += ["", f"bf16 rows are held to the bf16 GEMM rate. Compile time: "
           f"{'n/a' if compile_s is None else f'{compile_s:.0f} s'}. Head alone: full {head['head_full']:.3f} s, "
           f"largest buffer {head['head_full_largest_mb']:.0f} MB; chunked {head['head_chunked']:.3f} s, "
           f"{head['head_chunked_largest_mb']:.0f} MB. Optimizer step: Muon {optim['muon_step_s']:.3f} s, AdamW "
           f"{optim['adamw_step_s']:.3f} s ({optim['muon_over_adamw']:.2f}x; Newton-Schulz "
           f"{optim['newton_schulz_gflop']:.1f} GFLOP, at {optim['newton_schulz_gflops_fp32']:.0f} GFLOP/s)"
           + (f"; Muon with bf16 Newton-Schulz {optim['muon_bf16_ns_step_s']:.3f} s "
              f"({optim['muon_bf16_ns_over_adamw']:.2f}x)." if "muon_bf16_ns" in opts else ".")]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
