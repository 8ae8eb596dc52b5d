"""RL rollouts from an OpenAI-compatible server: the generator interface of k2lab.serve.rollout over HTTP.

Token in, token out, as vLLM serves it: each prompt goes to `POST /v1/completions` as a list of token ids with
`n` = K samples, `logprobs: 0` and vLLM's `return_tokens_as_token_ids`, so the completion comes back as ids
("token_id:N") with the log-probability of each sampled token; text is never re-tokenized. The log-probs must
be those of the distribution sampled from (after temperature, top-k, top-p), which vLLM and k2lab's server give
when started with `--logprobs-mode processed_logprobs`; the trainer's log-ratio metrics show it when they are
not (a non-zero log-ratio at staleness 0).

Seeds: sample j of prompt i asks for seed `params.seed + i*K` (a server seeds choice j with seed + j, as vLLM
and k2lab's server do), so every sample has its own seed. Prompts are sent concurrently so the server batches
them. `update_weights(path)` is SGLang's `POST /update_weights_from_disk` (k2lab's server implements it: the
trainer's weight sync between steps); `policy_version` is the trainer step whose weights the server holds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from k2lab.serve.rollout import RolloutParams, RolloutSample


class RemoteGenerator:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 policy_version: int = 0, concurrency: int = 32, timeout: float = 600.0):
        """base_url: the server's OpenAI base (…/v1); model: the served model id (default: the first listed)."""
        import httpx
        from openai import OpenAI

        self.base_url, self.api_key = base_url.rstrip("/"), api_key or "EMPTY"
        self.client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=2)
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            self.model = model or self.client.models.list().data[0].id
        except Exception as e:  # openai's connection and status errors: say which server and what to do
            raise ValueError(f"rollout server {base_url}: {e}; start it (k2lab serve --logprobs-mode "
                             f"processed_logprobs) or fix --rollout-url") from None
        self.policy_version, self.concurrency = policy_version, concurrency

    def generate(self, prompts: Sequence[Sequence[int]], k: int = 1,
                 params: RolloutParams = RolloutParams()) -> list[RolloutSample]:
        """k samples of every prompt, prompt-major (sample j of prompt i is at i * k + j)."""
        if not prompts or k < 1:
            raise ValueError(f"need at least one prompt and k >= 1, got {len(prompts)} prompts and k={k}")
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            parts = list(pool.map(lambda i: self._prompt(i, list(prompts[i]), k, params), range(len(prompts))))
        return [smp for part in parts for smp in part]

    def _prompt(self, i: int, prompt: list[int], k: int, params: RolloutParams) -> list[RolloutSample]:
        extra = {"return_tokens_as_token_ids": True, "stop_token_ids": list(params.stop_token_ids)}
        if params.top_k:
            extra["top_k"] = params.top_k
        out = self.client.completions.create(
            model=self.model, prompt=prompt, n=k, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=(params.seed + i * k) % 2**63, logprobs=0, extra_body=extra)
        samples = []
        for j, choice in enumerate(sorted(out.choices, key=lambda c: c.index)):
            lp = choice.logprobs
            if lp is None or lp.tokens is None or not all(t.startswith("token_id:") for t in lp.tokens):
                raise ValueError(f"rollout server {self.base_url} did not return token ids with log-probs "
                                 f"(needs vLLM's return_tokens_as_token_ids)")
            ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
            reason = "length" if choice.finish_reason == "length" else "stop"
            samples.append(RolloutSample(i, j, prompt, ids, [float(x) for x in lp.token_logprobs], reason,
                                         self.policy_version))
        return samples

    def update_weights(self, model_path: str) -> None:
        """SGLang's weight reload: the server loads the checkpoint at model_path (a path it can read)."""
        root = self.base_url.removesuffix("/v1")
        r = self.http.post(f"{root}/update_weights_from_disk", json={"model_path": str(model_path)})
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not body.get("success"):
            raise ValueError(f"rollout server {root} did not load {model_path}: "
                             f"{body.get('message') or body.get('error') or r.text[:200]}")
