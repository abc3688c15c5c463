"""Per-request sampling: penalties, then greedy or temperature / top-k / top-p, seeded.

For one row of logits l (vocab,), with the request's prompt ids P and output ids O:

    repetition (CTRL, Keskar et al. 2019, Sec. 4.1): l_t <- l_t / rho if l_t > 0 else l_t * rho,  t in P u O
    frequency / presence (OpenAI):                    l_t <- l_t - f * count_O(t) - p * [count_O(t) > 0]
    token ~ softmax(l / T) restricted to the top k and to the smallest set of mass >= top_p

drawn by inverse transform: the kept probabilities (in descending order where top-k or top-p
cut them), their cumulative sum c, and the first j with c_j >= u · c_last for one uniform u
from the request's generator. The
whole batch's rows without penalties or log-probabilities are drawn together on the device
(``sample_rows``: one sort, one cumulative sum, one search; one uniform a row from the host),
and a single row (``sample``) goes through the same code, so both give the same token for the
same seed.

A temperature below ``GREEDY_BELOW`` is greedy (as vLLM does): dividing by 1e-40 overflows
to inf and the softmax to NaN. Log-probabilities, when asked for, are those of the model's
own distribution, log softmax(l) before penalties and temperature (vLLM's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5
# the seeds torch.Generator.manual_seed accepts (a signed or unsigned 64-bit integer)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
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
        if self.seed is not None and not (
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
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

    @property
    def batched_sample(self) -> bool:
        """Drawn with the batch's other such rows (``sample_rows``): no penalties, no log-probabilities."""
        return not self.greedy and not self.penalized and self.logprobs is None


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
        token = int(sample_rows(scores[None], [p], [generator])[0])
    return token, (logprob_record(logits, token, p.logprobs) if p.logprobs is not None else None)


def uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform in [0, 1) a row: from the request's seeded generator, else torch's own."""
    return torch.stack([torch.rand((), generator=g) for g in generators])  # (B,) on the CPU


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """One token a row of ``logits`` (B, V), each row with its temperature, top-k and top-p,
    on the logits' device: (B,) token ids. Rows that top-k or top-p cut are drawn in descending
    order of probability, the others in vocabulary order (no sort), whatever the batch."""
    u = uniforms(generators).to(logits.device)
    cut = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1]
    if len(cut) in (0, len(params)):
        return _draw(logits, params, u, sort=bool(cut))
    plain = [i for i in range(len(params)) if i not in set(cut)]
    out = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for rows, sort in ((cut, True), (plain, False)):
        out[rows] = _draw(logits[rows], [params[i] for i in rows], u[rows], sort)
    return out


def _draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, sort: bool) -> torch.Tensor:
    dev, v = logits.device, logits.shape[-1]
    t = torch.tensor([p.temperature for p in params], device=dev)
    scores = logits.float() / t[:, None]  # (B, V)
    if sort:  # descending, to cut the top k and the top_p mass
        k = torch.tensor([p.top_k or v for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        scores, order = scores.sort(stable=True, dim=-1, descending=True)
        scores = scores.masked_fill(torch.arange(v, device=dev) >= k[:, None], float("-inf"))  # the top k
    probs = torch.softmax(scores, -1)
    if sort:
        probs = probs * ((probs.cumsum(-1) - probs) < top_p[:, None])  # the smallest set reaching top_p
    cdf = probs.cumsum(-1)  # (B, V)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(v - 1)  # (B, 1): first c_j >= u c_last
    return (order.gather(1, j) if sort else j)[:, 0]


def logprob_record(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    lp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(lp, k) if k else None
    chosen = float(lp[token])
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return (chosen if math.isfinite(chosen) else -9999.0), alternatives
