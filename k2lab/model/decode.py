"""A static-shape decode step over a static latent-cache layout, compiled with torch.compile.

Compiling the model's own forward does not pay: `CacheBatch` reads `int(positions.max())`, the MoE sorts
tokens by expert (`bincount`, `tolist()`), and every new context length is a new shape. `Decoder` keeps the
same math (absorbed MLA, noaux_tc routing, SwiGLU experts) in a form whose shapes never change for a given
(batch-size bucket, max_len):
- the model's own LatentCache, one tensor per layer, updated in place with `index_put_` (a single stacked
  tensor would be copied whole by the compiled graph every step);
- attention over the full cache length, masked to key positions <= the query position;
- compiled for CPU, where decode is bound by memory traffic: the attention scores, the chosen experts and the
  linears of up to 16 rows written as products summed over an axis, which inductor compiles into loops that
  read the cache and each weight row once, where it lies (BLAS reads them with one to a few query rows at a
  fraction of the bandwidth, and a gather of expert weights copies them first); `bench/decode.py` measures it;
- eager and on CUDA: matmuls; experts gathered per token while tokens * k < experts, every expert over every
  token with zero weights beyond that;
- RoPE as real cos/sin arithmetic (the same products as the eager complex multiply; inductor has no complex).
Steps either feed rows 0..batch-1 (generate, the rollout API: one graph) or chosen cache slots (the engine:
one graph per power-of-two count of rows, padded with slots not in the step). The prompt is prefilled eagerly,
in chunks, through the model's own cached forward into the same cache, so prefill is the eager math and long
prompts stay within memory. Compiled artifacts are cached across processes under $TORCHINDUCTOR_CACHE_DIR
(default ~/.cache/k2lab/inductor); each new graph's compile time is reported on stderr and summed in
`compile_seconds`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from k2lab.model.mla import LatentCache
from k2lab.model.moe import MLP, Experts, MoE

_KEEP = 4  # compiled decoders kept per model by decoder_for (their caches are the memory that matters)
_GRAPHS = 64  # dynamo's recompile limit (8) counts the graphs of every Decoder in the process; a few per decoder


def cache_dir() -> Path:
    """Where inductor keeps compiled kernels and graphs across processes (set before the first compile)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "k2lab" / "inductor"
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))


def bucket(n: int, least: int = 1) -> int:
    """The next power of two >= max(n, least): batch sizes and cache lengths are rounded to buckets."""
    return 1 << (max(n, least) - 1).bit_length()


def compilable(model: torch.nn.Module) -> bool:
    """Whether Decoder can run this model: a text model (lm_head over model.layers) with full-precision experts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return hasattr(model, "lm_head") and layers is not None and all(
        not isinstance(block.mlp, MoE) or isinstance(block.mlp.experts, Experts) for block in layers)


class Decoder:
    """Decoding over `batch` cache slots of up to `max_len` positions each, for one model.

    `prefill(ids, rows)` writes prompts into slots and returns their last logits; `step(tokens, positions)`
    feeds one token per slot 0..n-1 at the given positions, `step(tokens, positions, rows)` one token per
    given slot; both return logits [n, vocab]. `latent` is the cache (a LatentCache: the model's own cached
    forward reads and writes it too). Positions must be < max_len (the compiled step does not check).
    """

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, compile: bool = True,
                 prefill_chunk: int = 2048):
        if not compilable(model):
            raise ValueError("compiled decode needs a text model with full-precision experts (not INT4); "
                             "decode with compile=False")
        self.model, self.batch, self.max_len, self.prefill_chunk = model, batch, max_len, prefill_chunk
        param = model.lm_head.weight
        with torch.inference_mode(False):  # normal tensors: written in place under no_grad and inference_mode
            self.latent = LatentCache(model.config, batch, max_len, param.dtype, param.device)
        self.cache = self.latent.kv
        self.all_rows = torch.arange(batch, device=param.device)
        self.compile_seconds = 0.0  # first calls of each compiled graph (compile, or load from the cache)
        self._graphs: set[tuple[int, bool]] = set()
        self._compiled = compile
        self._fused = compile and param.device.type == "cpu"  # the CPU forms (module docstring); eager keeps matmuls
        if compile:
            cache_dir()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _GRAPHS)
            cuda = param.device.type == "cuda"
            if cuda:  # CUDA graphs replay the step; the caches must keep their addresses
                for kv in self.cache:
                    torch._dynamo.mark_static_address(kv)
            self._step = torch.compile(self._forward, dynamic=False, fullgraph=True,
                                       mode="reduce-overhead" if cuda else None)
        else:
            self._step = self._forward

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, rows: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts input_ids [n, T] into cache slots rows [n] (default 0..n-1), with inputs_embeds [n, T, D] in
        place of their embeddings when given: the eager cached forward in chunks of prefill_chunk tokens (long
        prompts stay within memory). Returns the last logits [n, vocab]."""
        n, t = input_ids.shape
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the decoder's cache of {self.max_len}")
        device = self.all_rows.device
        rows = self.all_rows[:n] if rows is None else rows.to(device)
        for start in range(0, t, self.prefill_chunk):
            end = min(t, start + self.prefill_chunk)
            positions = torch.arange(start, end, device=device)[None].expand(n, -1)
            if inputs_embeds is None:
                logits = self.model(input_ids[:, start:end].to(device), positions=positions, cache=self.latent,
                                    rows=rows)
            else:
                logits = self.model(inputs_embeds=inputs_embeds[:, start:end].to(device), positions=positions,
                                    cache=self.latent, rows=rows)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [n] at positions [n] of slots `rows` [n] (default 0..n-1) -> logits [n, vocab].

        Without rows, all `batch` slots step (those beyond n at position 0 of their own slot, their output
        dropped): one shape. With rows, the step runs bucket(n) rows (at most batch), padded with slots not in
        rows at position max_len - 1: a slot writes a position before it reads it, so nothing is lost."""
        # inference tensors in, always: dynamo guards on dispatch keys, so normal tensors (from callers under
        # no_grad) and inference tensors (from callers under inference_mode) would each compile a graph
        tokens, positions = tokens.clone(), positions.clone()
        rows = None if rows is None else rows.clone()
        n = tokens.shape[0]
        gather = rows is not None
        if gather:
            size = min(bucket(n), self.batch)
            if size > n:
                free = torch.ones(self.batch, dtype=torch.bool, device=rows.device)
                free[rows] = False
                rows = torch.cat([rows, free.nonzero()[: size - n, 0]])
        else:
            size, rows = self.batch, self.all_rows.clone()
        if size > n:
            pad = (0, size - n)
            tokens, positions = F.pad(tokens, pad), F.pad(positions, pad, value=self.max_len - 1 if gather else 0)
        if not self._compiled or (size, gather) in self._graphs:
            return self._step(self.cache, tokens, positions, rows, gather)[:n]
        start = time.perf_counter()
        logits = self._step(self.cache, tokens, positions, rows, gather)
        seconds = time.perf_counter() - start
        self._graphs.add((size, gather))
        self.compile_seconds += seconds
        print(f"k2lab: compiled the decode step for {size} rows x {self.max_len} positions in {seconds:.1f} s "
              f"(kept in {cache_dir()} for later processes)", file=sys.stderr, flush=True)
        return logits[:n]

    # ---- the step, traced by torch.compile ------------------------------------------------------------------
    def _forward(self, cache: list[torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor,
                 rows: torch.Tensor, gather: bool) -> torch.Tensor:
        """One token per row; gather: attend to the cache slots `rows` (else rows are all slots, in order)."""
        model = self.model.model
        x = model.embed_tokens(tokens)  # [B, D]
        rope = model.rotary_emb
        angles = positions.to(torch.float32)[:, None] * rope.inv_freq  # [B, rope/2]
        cos, sin = rope.scale * angles.cos(), rope.scale * angles.sin()
        visible = torch.arange(self.max_len, device=x.device)[None, :] <= positions[:, None]  # [B, S]
        for block, kv in zip(model.layers, cache):
            h = x + self._attention(block.self_attn, block.input_layernorm(x), cos, sin, kv, rows, positions,
                                    visible, gather)
            x = h + self._ffn(block.mlp, block.post_attention_layernorm(h))
        return self._linear(self.model.lm_head, model.norm(x))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Adjacent pairs of x [B, (H,) rope] times (cos + i sin) [B, (1,) rope/2], as apply_rope does."""
        pairs = x.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(x.dtype)

    def _attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor, gather: bool) -> torch.Tensor:
        """Absorbed MLA for one token per row: x [B, D] -> [B, D]; writes the token's latent into kv."""
        bsz, h, r = x.shape[0], attn.n_heads, attn.kv_lora_rank
        nope, rope_dim = attn.qk_nope_head_dim, attn.qk_rope_head_dim
        linear = self._linear
        q = (linear(attn.q_proj, x) if attn.q_lora_rank is None
             else linear(attn.q_b_proj, attn.q_a_layernorm(linear(attn.q_a_proj, x))))
        q_nope, q_rope = q.view(bsz, h, attn.qk_head_dim).split([nope, rope_dim], dim=-1)
        q_rope = Decoder._rotate(q_rope, cos[:, None], sin[:, None])
        c_kv, k_rope = linear(attn.kv_a_proj_with_mqa, x).split([r, rope_dim], dim=-1)
        latent = torch.cat([attn.kv_a_layernorm(c_kv), Decoder._rotate(k_rope, cos, sin)], dim=-1)
        kv.index_put_((rows, positions), latent.to(kv.dtype))
        ctx = kv[rows] if gather else kv  # [B, S, r + rope]
        w = attn.kv_b_proj.weight.view(h, nope + attn.v_head_dim, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)  # k_nope folded into the query
        query = torch.cat([q_lat, q_rope], dim=-1)  # [B, H, r + rope]
        if self._fused:  # products summed in generated loops: the cache is read once per reduction, in place
            scores = (ctx[:, None] * query[:, :, None]).sum(-1)  # [B, H, S]
        else:
            scores = torch.einsum("bhc,bsc->bhs", query, ctx)
        scores = scores * attn.softmax_scale
        probs = scores.float().masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1).to(kv.dtype)
        # the weighted sum over positions stays a matmul: a generated reduction over S is slower from 32K on
        o_lat = torch.einsum("bhs,bsr->bhr", probs, ctx[..., :r])
        out = torch.einsum("bhr,hvr->bhv", o_lat, w_uv)  # v folded into the output
        return linear(attn.o_proj, out.reshape(bsz, -1).to(x.dtype))

    def _ffn(self, mlp, x: torch.Tensor) -> torch.Tensor:
        if isinstance(mlp, MLP):
            return self._mlp(mlp, x)
        idx, weight = mlp.gate(x)  # [B, k]
        gate, up, down = mlp.experts.weights()
        if self._fused:  # the chosen experts' rows are read where they lie, inside the generated reductions
            flat = idx.flatten()
            xs = x.repeat_interleave(idx.shape[1], dim=0)[:, None]  # [B*k, 1, D], one row per (token, choice)
            hidden = F.silu((gate[flat] * xs).sum(-1)) * (up[flat] * xs).sum(-1)  # [B*k, I]
            y = (down[flat] * hidden[:, None]).sum(-1) * weight.flatten()[:, None].to(x.dtype)
            return y.view(*idx.shape, -1).sum(1) + self._mlp(mlp.shared_experts, x)
        # matmuls against transposed views of [E, N, K] weights: BLAS reads them in place, where an einsum
        # contracting over (expert, row) would copy the whole weight tensor every step
        if idx.numel() < mlp.experts.n_experts:  # few tokens: gather the chosen experts' weights
            flat = idx.flatten()
            xs = x.repeat_interleave(idx.shape[1], dim=0)[:, None]  # [B*k, 1, D], one row per (token, choice)
            hidden = F.silu(xs @ gate[flat].transpose(1, 2)) * (xs @ up[flat].transpose(1, 2))  # [B*k, 1, I]
            y = (hidden @ down[flat].transpose(1, 2))[:, 0] * weight.flatten()[:, None].to(x.dtype)
            y = y.view(*idx.shape, -1).sum(1)
        else:  # more (token, choice) pairs than experts: run every expert, weighted 0 where not chosen
            dense = torch.zeros(*x.shape[:1], gate.shape[0], dtype=x.dtype, device=x.device)
            dense = dense.scatter(1, idx, weight.to(x.dtype))  # [B, E]
            hidden = F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))  # [E, B, I]
            y = ((hidden * dense.T[..., None]) @ down.transpose(1, 2)).sum(0)
        return y + self._mlp(mlp.shared_experts, x)

    def _linear(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) for x [B, K]. On the fused path a plain nn.Linear over up to 16 rows is the weight [N, K] times
        x summed over K, which reads the weight in its row-major layout (BLAS's x @ weight.T reads it at a
        fraction of the bandwidth for a few rows). `(weight @ x.T).T`, as fast, was miscompiled by inductor
        (torch 2.13, 5-16 rows: logits off by ~3; test_compiled_math_of_every_row_count_path)."""
        rows = x.shape[0]
        if not self._fused or type(module) is not torch.nn.Linear or rows > 16:
            return module(x)
        y = (module.weight * x[:, None]).sum(-1)
        return y if module.bias is None else y + module.bias

    def _mlp(self, mlp: MLP, x: torch.Tensor) -> torch.Tensor:
        return self._linear(mlp.down_proj, F.silu(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))


def decoder_for(model: torch.nn.Module, batch: int, max_len: int) -> Decoder:
    """The model's compiled decoder for `batch` rows and `max_len` positions, rounded up to buckets (powers
    of two; at least 256 positions) so that calls of similar sizes share one compiled step. A kept decoder at
    most 4x the needed work (rows x positions) serves a smaller call, so that fewer sizes pay a compile."""
    need = (bucket(batch), min(bucket(max_len, 256), max(max_len, model.config.max_position_embeddings)))
    kept = vars(model).setdefault("compiled_decoders", {})  # held by the model, so they go when it goes
    fits = [key for key in kept
            if key[0] >= need[0] and key[1] >= need[1] and key[0] * key[1] <= 4 * need[0] * need[1]]
    key = min(fits, key=lambda k: k[0] * k[1]) if fits else need
    if key not in kept:
        if len(kept) >= _KEEP:  # drop the least recently used
            kept.pop(next(iter(kept)))
        kept[key] = Decoder(model, *key)
    else:
        kept[key] = kept.pop(key)  # most recently used last
    return kept[key]
