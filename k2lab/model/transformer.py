"""Blocks, K2Model and K2ForCausalLM: pre-norm MLA + (dense | MoE) FFN, final norm, head (untied in K2; tied
when the config sets tie_word_embeddings)."""

from __future__ import annotations

import torch
from torch import nn

from k2lab.config import ModelConfig
from k2lab.model.loss import chunked_cross_entropy
from k2lab.model.decode import decoder_for
from k2lab.model.mla import MLA, CacheBatch, LatentCache
from k2lab.model.moe import MLP, MoE
from k2lab.model.norm import RMSNorm
from k2lab.model.rope import RotaryEmbedding
from k2lab.model.sampling import sample


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, batch: CacheBatch | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        device = self.input_layernorm.weight.device  # layers may live on different devices (device_map)
        x, rotation = x.to(device), rotation.to(device)
        attn_mask = attn_mask.to(device) if attn_mask is not None else None
        h = x + self.self_attn(self.input_layernorm(x), rotation, batch, self.layer, attn_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class K2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                rows: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, t = x.shape[:2]
        attn_mask = None
        if document_ids is not None:
            if cache is not None or positions is not None:
                raise ValueError("document_ids (packed rows) go without a cache and without positions")
            positions, attn_mask = packed_positions_and_mask(document_ids.to(x.device))
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is given")
            positions = torch.arange(t, device=x.device)[None].expand(bsz, t)
        batch = CacheBatch.build(cache, positions, rows) if cache is not None else None
        rotation = self.rotary_emb(positions)
        for block in self.layers:
            x = block(x, rotation, batch, attn_mask)
        return self.norm(x)


def packed_positions_and_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows [B, T] where each run of equal ids is one document: positions that restart at 0 in every
    document [B, T], and a block-diagonal causal mask [B, 1, T, T] (True = may attend) so no token sees
    another document."""
    bsz, t = document_ids.shape
    idx = torch.arange(t, device=document_ids.device).expand(bsz, t)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of each token's run
    run = starts.cumsum(dim=1)  # runs, not ids, so a repeated id later in the row is another document
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    mask = (run[:, :, None] == run[:, None, :]) & causal
    return idx - first, mask[:, None]


class K2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With config.tie_word_embeddings, one matrix reads tokens in and scores them out (K2 itself unties
        them); called again wherever the parameters are replaced (checkpoint loading, a gathered FSDP copy)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases (as transformers does)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for module in self.modules():
            if hasattr(module, "e_score_correction_bias") and not module.e_score_correction_bias.is_meta:
                module.e_score_correction_bias.zero_()

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                rows: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]. Without a cache: causal attention over the given tokens; with `document_ids`
        [B, T] (packed rows) attention stays within each run of equal ids and positions restart per run.
        With a cache: the tokens sit at `positions` [B, T] of cache slots `rows` [B] (default 0..B-1) and
        attend to what is cached there, absorbed (latent-only) for short inputs."""
        h = self.model(input_ids, inputs_embeds, positions, cache, rows, document_ids)
        return self.lm_head(h.to(self.lm_head.weight.device))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D]: what `inputs_embeds` replaces (image features go in there)."""
        return self.model.embed_tokens(input_ids)

    @property
    def device(self) -> torch.device:
        """Where logits (and the cache built by new_cache) live."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
             document_ids: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
             token_gradients: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy of `targets` [B, T] over the tokens `mask` [B, T] keeps, per-token losses [B, T])
        for inputs [B, T], with the head and loss in chunks (k2lab.model.loss): the [B, T, vocab] logits are
        never built. normalizer: divide the summed loss by this instead of the counted tokens' number;
        token_gradients: let the per-token losses carry gradients too (see chunked_cross_entropy)."""
        h = self.model(input_ids, document_ids=document_ids)
        return chunked_cross_entropy(h.to(self.device), self.lm_head.weight, targets, mask,
                                     normalizer=normalizer, token_gradients=token_gradients)

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        return LatentCache(self.config, slots, max_len, dtype or self.dtype, self.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | None = None,
                 inputs_embeds: torch.Tensor | None = None, compile: bool = False) -> torch.Tensor:
        """Prompt [B, T] plus up to max_new_tokens sampled tokens (greedy at temperature 0); rows that emit
        eos_token_id keep emitting it so the batch stays rectangular. inputs_embeds [B, T, D], when given,
        replaces the prompt's embeddings in the prefill (the multimodal model puts image features there).
        compile=True decodes through the compiled static-shape step of k2lab.model.decode."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        bsz, t = input_ids.shape
        if t + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt {t} + {max_new_tokens} new tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        device = self.device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        decoder = decoder_for(self, bsz, t + max_new_tokens) if compile else None
        cache = None if compile else self.new_cache(bsz, t + max_new_tokens)
        tokens = input_ids.to(device)
        positions = torch.arange(t, device=device)[None].expand(bsz, t)
        if decoder is not None:
            logits = decoder.prefill(tokens, inputs_embeds=inputs_embeds)
        elif inputs_embeds is not None:
            logits = self(inputs_embeds=inputs_embeds.to(device), positions=positions, cache=cache)[:, -1]
        else:
            logits = self(tokens, positions=positions, cache=cache)[:, -1]
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        out = [tokens]
        for step in range(max_new_tokens):
            uniform = torch.rand(bsz, generator=gen, device=device) if temperature > 0 else None
            nxt, _ = sample(logits, temperature, top_p, uniform=uniform)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            positions = torch.full((bsz, 1), t + step, device=device)
            if decoder is not None:
                logits = decoder.step(nxt, positions[:, 0])
            else:
                logits = self(nxt[:, None], positions=positions, cache=cache)[:, -1]
        return torch.cat(out, dim=1)


def parameter_counts(model: K2ForCausalLM) -> dict[str, int]:
    """Stored tensor sizes (parameters + routing biases) and those active per token: all but the routed
    experts not chosen (k of E per MoE layer). Works on a model built on the meta device."""
    total = sum(t.numel() for t in model.state_dict().values())
    if model.lm_head.weight is model.model.embed_tokens.weight:  # tied: one matrix under two names
        total -= model.lm_head.weight.numel()
    inactive = 0
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            experts = block.mlp.experts
            routed = sum(p.numel() for p in experts.parameters())
            inactive += routed - routed * model.config.num_experts_per_tok // experts.n_experts
    return {"total": total, "active": total - inactive,
            "embedding": model.model.embed_tokens.weight.numel(), "lm_head": model.lm_head.weight.numel()}

