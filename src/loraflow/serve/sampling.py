"""Per-request sampling: penalties, then greedy or temperature / top-k / top-p, seeded.

For one row of logits l (vocab,), with the request's prompt ids P and output ids O:

    repetition (CTRL, Keskar et al. 2019, Sec. 4.1): l_t <- l_t / rho if l_t > 0 else l_t * rho,  t in P u O
    frequency / presence (OpenAI):                    l_t <- l_t - f * count_O(t) - p * [count_O(t) > 0]
    token ~ softmax(l / T) restricted to the top k and to the smallest set of mass >= top_p

A temperature below ``GREEDY_BELOW`` is greedy (as vLLM does): dividing by 1e-40 overflows
to inf and the softmax to NaN. Log-probabilities, when asked for, are those of the model's
own distribution, log softmax(l) before penalties and temperature (vLLM's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    frequency_penalty: float = 0.0  # [-2, 2], on output tokens
    presence_penalty: float = 0.0  # [-2, 2], on output tokens
    repetition_penalty: float = 1.0  # > 0, on prompt and output tokens; 1: none
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely (k <= 20)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name, lo, hi in (("temperature", 0, 100), ("frequency_penalty", -2, 2), ("presence_penalty", -2, 2)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:  # NaN fails too
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10] (1: none), got {self.repetition_penalty!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if len(self.stop) > 16 or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be at most 16 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)

    @property
    def batched_greedy(self) -> bool:
        """The plain argmax of the step's batched logits is this request's token."""
        return self.greedy and not self.penalized and self.logprobs is None


class NonFiniteLogits(ValueError):
    """The model produced NaN or inf logits for this request (its adapter, most likely)."""


def penalize(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """Logits (vocab,) with the repetition, frequency and presence penalties applied."""
    if not p.penalized:
        return logits
    logits = logits.float().clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        seen_logits = logits[seen]
        logits[seen] = torch.where(
            seen_logits > 0, seen_logits / p.repetition_penalty, seen_logits * p.repetition_penalty
        )
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel()).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def sample(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
    prompt_ids: list[int] = (),
    output_ids: list[int] = (),
) -> tuple[int, tuple | None]:
    """One token id from logits (vocab,), and its log-probability record when asked for:
    (logprob of the token, [(id, logprob) of the ``p.logprobs`` most likely])."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits(
            "the model produced non-finite logits (NaN or inf) for this request; "
            "its adapter's weights are the likely cause"
        )
    scores = penalize(logits, p, list(prompt_ids), list(output_ids))
    if p.greedy:
        token = int(torch.argmax(scores))
    else:
        scores = scores.float() / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if p.top_p < 1:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return token, (logprob_record(logits, token, p.logprobs) if p.logprobs is not None else None)


def logprob_record(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    chosen = float(lp[token])
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return (chosen if math.isfinite(chosen) else -9999.0), alternatives
