"""Training throughput: tokens/s and optimizer-step time of Muon relative to AdamW on `tiny` and `small`, and
tokens/s of 2 gloo processes (torchrun, FSDP2) relative to 1 at the same global batch.

Medians over timed steps after one warm-up step. The machine is 2 CPU cores shared with other jobs, so absolute
numbers are noisy; the ratios are measured in the same run, back to back. One thread per process throughout.

    python bench/train.py                     # -> bench/results/train.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.optim.muon import build_optimizer
from k2lab.runs import write_json
from k2lab.train.data import build_dataset, embedded_corpus
from k2lab.train.metrics import read_metrics

OUT = Path(__file__).parent / "results" / "train.json"


def optimizer_bench(preset: str, batch: int, seq: int, steps: int) -> dict:
    config = ModelConfig.preset(preset)
    out = {}
    for kind in ("adamw", "muon"):
        torch.manual_seed(0)
        model = K2ForCausalLM(config).train()
        opt = build_optimizer(model, kind=kind, lr=1e-3)
        ids = torch.randint(0, config.vocab_size - 256, (batch, seq + 1))
        step_s, opt_s = [], []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i:  # the first step allocates optimizer state
                step_s.append(t2 - t0)
                opt_s.append(t2 - t1)
        out[kind] = {"tokens_per_s": batch * seq / statistics.median(step_s),
                     "optimizer_step_s": statistics.median(opt_s)}
    out["muon_over_adamw_optimizer_step"] = out["muon"]["optimizer_step_s"] / out["adamw"]["optimizer_step_s"]
    out["muon_over_adamw_tokens_per_s"] = out["muon"]["tokens_per_s"] / out["adamw"]["tokens_per_s"]
    out.update(batch=batch, seq_len=seq, timed_steps=steps)
    return out


def gloo_bench(steps: int = 8) -> dict:
    """Median tokens/s (steps 2..) of `torchrun -m k2lab.train.pretrain` with 1 and 2 processes on tiny."""
    seq, batch = 64, 8
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "data"

        class Bytes:  # the data is only timed, not learned from: a byte encoding avoids training a tokenizer
            def encode(self, text):
                return list(text.encode())

        build_dataset(embedded_corpus()[:200], Bytes().encode, 8192 - 255, seq, steps * batch, 8, 0, base)
        for n in (1, 2):
            run_dir = Path(tmp) / f"n{n}"
            (run_dir / "data").mkdir(parents=True)
            for f in base.iterdir():
                (run_dir / "data" / f.name).write_bytes(f.read_bytes())
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "-m", "k2lab.train.pretrain", "--run-dir", str(run_dir), "--seq-len", str(seq), "--batch-size",
                   str(batch), "--max-steps", str(steps), "--warmup-steps", "1", "--val-rows", "8",
                   "--eval-every", "1000"]  # data/ is pre-packed, so no tokenizer is trained
            env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: 1 core vs 2 cores
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            tps = [r["tokens_per_s"] for r in read_metrics(run_dir)][1:]
            res[f"{n}_process"] = {"tokens_per_s": statistics.median(tps), "threads_per_process": 1}
    res["two_over_one_tokens_per_s"] = res["2_process"]["tokens_per_s"] / res["1_process"]["tokens_per_s"]
    res.update(seq_len=seq, global_batch=batch, steps=steps)
    return res


def main() -> None:
    torch.set_num_threads(1)  # 2 threads on these 2 shared cores contend with other jobs (~15x slower)
    results = {"tiny": optimizer_bench("tiny", 8, 128, 5), "small": optimizer_bench("small", 2, 128, 3),
               "gloo_tiny": gloo_bench(), "note": "2 shared CPU cores, fp32; medians; noisy absolute numbers"}
    write_json(OUT, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
