"""Serving throughput on this machine: aggregate generated tokens/s at 1, 8 and 32 concurrent streaming clients
of the OpenAI-compatible server (ratios to 1 client), time to first token, and the engine's decode tokens/s vs
transformers' `generate` at the same batch size on the same weights (the k2lab checkpoint loaded as
DeepseekV3ForCausalLM).

    python bench/serve.py [--preset tiny] [--max-tokens 32] [--quick]

Random weights, fp32, and no stop tokens (every request generates exactly --max-tokens, as transformers does
with min_new_tokens), so both sides do the same work. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch
import uvicorn

from k2lab import save_model
from k2lab.config import ModelConfig
from k2lab.model import K2ForCausalLM
from k2lab.serve.engine import Engine
from k2lab.serve.sampling import SamplingParams
from k2lab.serve.server import Server, create_app
from k2lab.tokenizer import train_tokenizer

RESULTS = Path(__file__).parent / "results"
PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number, iteratively\n"


def serve_clients(server: Server, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent streaming clients, each sending `rounds` requests one after another. The clients run
    in their own process so their JSON parsing does not share the server's interpreter lock."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=client_process, args=(port, clients, rounds, max_tokens, results))
    proc.start()
    out = results.get()
    proc.join()
    uv.should_exit = True
    thread.join()
    return out


def client_process(port: int, clients: int, rounds: int, max_tokens: int, results) -> None:
    ttfts, tokens = [], 0

    async def client(c):
        nonlocal tokens
        for _ in range(rounds):
            start, first = time.perf_counter(), None
            stream = await c.completions.create(model="bench", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
            async for ch in stream:
                if first is None and ch.choices:
                    first = time.perf_counter() - start
                if ch.usage:
                    tokens += ch.usage.completion_tokens
            ttfts.append(first)

    async def run():
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
            await client(c)  # warm-up request (connection, first forward), not timed
            ttfts.clear()
            nonlocal tokens
            tokens = 0
            start = time.perf_counter()
            await asyncio.gather(*(client(c) for _ in range(clients)))
            return time.perf_counter() - start

    wall = asyncio.run(run())
    results.put({"clients": clients, "requests": clients * rounds, "tokens": tokens, "seconds": wall,
                 "tokens_per_s": tokens / wall, "ttft_median_ms": 1000 * statistics.median(ttfts)})


def engine_decode(model, batch: int, prompt_len: int, new: int) -> float:
    """Engine decode tokens/s with `batch` requests in flight (time after every request has its first token)."""
    engine = Engine(model, lambda t: b"x", (), max_len=prompt_len + new, max_slots=batch,
                    prefill_chunk=batch * prompt_len)
    prompts = torch.randint(0, 1000, (batch, prompt_len)).tolist()
    reqs = [engine.submit(p, SamplingParams(max_tokens=new, temperature=0.0)) for p in prompts]
    while not all(r.output for r in reqs):
        engine.step()
    start = time.perf_counter()
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    return batch * (new - 1) / (time.perf_counter() - start)


def hf_decode(hf, batch: int, prompt_len: int, new: int) -> float:
    """transformers generate decode tokens/s: (time for `new` tokens - time for 1 token) over batch*(new-1)."""
    ids = torch.randint(0, 1000, (batch, prompt_len))

    def gen(n):
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    return batch * (new - 1) / (gen(new) - gen(1))


def median(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (on a loaded shared 2-core machine, 2 OpenMP threads ran ~20x "
                         "slower than 1 from barrier waits)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.preset(args.preset)
    tok = train_tokenizer(config.vocab_size)
    model = K2ForCausalLM(config).eval()
    rounds = 1 if args.quick else 2
    repeats = 1 if args.quick else args.repeats

    rows = []
    for clients in (1, 8, 32):
        engine = Engine(model, tok.id_to_bytes, (), max_len=256, max_slots=32)
        rows.append(serve_clients(Server(engine, tok, "bench"), clients, rounds, args.max_tokens))
        print(f"{clients:3d} clients: {rows[-1]['tokens_per_s']:8.1f} tokens/s, TTFT {rows[-1]['ttft_median_ms']:.0f} ms")
    for r in rows:
        r["ratio_to_1_client"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]

    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    decode = []
    prompt_len, new = 32, args.max_tokens
    for batch in (1, 8, 32):
        ours = median(lambda: engine_decode(model, batch, prompt_len, new), repeats)
        ref = median(lambda: hf_decode(hf, batch, prompt_len, new), repeats)
        decode.append({"batch": batch, "k2lab_tokens_per_s": ours, "transformers_tokens_per_s": ref,
                       "ratio": ours / ref})
        print(f"decode batch {batch:2d}: k2lab {ours:8.1f}  transformers {ref:8.1f}  ratio {ours / ref:.2f}")

    out = {"preset": args.preset, "max_tokens": args.max_tokens, "quick": args.quick,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
           "note": "shared, loaded CPU: timings are noisy; medians where repeated",
           "clients": rows, "decode_vs_transformers": decode}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "serve.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(RESULTS / "serve.json")
    print(f"wrote {RESULTS / 'serve.json'}")


if __name__ == "__main__":
    main()
