"""Tensor-parallel serving (Megatron-LM: Shoeybi et al. 2019, Sec. 3): each of N ranks holds
1/N of every layer and runs the same engine over it (SPMD); two all-reduces a layer.

Column-parallel, q/k/v/gate/up (W split along d_out: rank i holds W_i, d_out/N rows, i.e.
n_heads/N query heads and n_kv_heads/N KV heads, or intermediate/N features):

    y_i = W_i x + b_i + (s·B)_i A x           x replicated: A whole, B split like W, no communication

Row-parallel, o/down (W split along d_in, the output of the layer before split the same way):

    y = Σ_i (W_i x_i + (s·B) A_i x_i) + b     A split like W, B whole: one all-reduce, b added once

FLoRA slots, y = Σ_k c_k ∘ (W0 (a_k ∘ x)) + b, shard the same way: a_k lies along d_in and c_k
along d_out, so a column shard keeps c_k's rows, a row shard a_k's, and since
W0 (a_k ∘ x) = Σ_i W0_i (a_k,i ∘ x_i) and c_k ∘ · is linear, the partial sums meet in the
same all-reduce. lm_head is vocab-parallel: rank i computes its V/N logits and one all-gather
gives every rank all of them, bit for bit the same, so every rank samples the same tokens
(a replicated head would cost each rank the whole V × dim matrix: 1 GB for Llama 3 in
bf16). Embeddings and norms are replicated; each rank's KV cache holds its n_kv_heads/N heads.

Rank 0 owns the API and the queue: before each step it broadcasts what only it sees (new
requests, aborts, timeouts, adapters registered through the API: ``share_step``), and every
rank then runs the same deterministic scheduler over the same state. Adapters load
synchronously under TP (the registry's ``synchronous``), so each rank's bank takes an
adapter at the same step. Decode steps run eagerly: CUDA graphs stay off (``Engine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loraflow.serve.bank import BankedLinear
from loraflow.serve.llama import Attention, Llama, LlamaArgs
from loraflow.serve.request import Request
from loraflow.serve.sampling import SamplingParams

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split d_out
ROW = ("o_proj", "down_proj")  # split d_in, then all-reduce


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among ``world`` ranks, and their process group (None: no
    communication, for building one rank's shard in a test)."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    @staticmethod
    def of(group: dist.ProcessGroup) -> TensorParallel:
        return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group)


@dataclass(frozen=True)
class Shard:
    """The 1/world of a layer held by ``rank``: ``dim`` 0 splits d_out (column-parallel),
    1 splits d_in (row-parallel). Weights are (d_out, d_in), A (r, d_in), C = s·B (d_out, r)."""

    dim: int
    rank: int
    world: int

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * n, n).contiguous()

    def factors(self, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole adapter's (A, C) for this layer -> this shard's: C's rows of a column shard
        (A stays whole), A's columns of a row shard (C stays whole)."""
        return (a, self.take(c, 0)) if self.dim == 0 else (self.take(a, 1), c)

    def whole(self, d_out: int, d_in: int) -> tuple[int, int]:
        """(d_out, d_in) of the whole layer, from this shard's."""
        return (d_out * self.world, d_in) if self.dim == 0 else (d_out, d_in * self.world)


def check_divisible(a: LlamaArgs, world: int) -> None:
    """Heads (and MLP features) split across ranks: a ValueError naming the sizes that work."""
    if world < 1:
        raise ValueError(f"--tensor-parallel must be at least 1, got {world}")
    common = math.gcd(a.n_heads, a.n_kv_heads, a.intermediate)
    if common % world:
        fits = [n for n in range(1, common + 1) if common % n == 0]
        raise ValueError(
            f"--tensor-parallel {world} does not divide this model's {a.n_heads} attention heads, "
            f"{a.n_kv_heads} key/value heads and {a.intermediate} MLP features; use one of {fits}"
        )


class RowParallelLinear(BankedLinear):
    """o_proj / down_proj split along d_in; the bias, whole, is added after the all-reduce."""

    def __init__(self, layer: BankedLinear, tp: TensorParallel):
        with torch.device("meta"):
            super().__init__(layer.d_in // tp.world, layer.d_out, bias=False)
        self.shard = Shard(1, tp.rank, tp.world)
        self.weight = nn.Parameter(self.shard.take(layer.weight.data, 1), requires_grad=False)  # (d_out, d_in/N)
        self.out_bias = layer.bias
        self.group = tp.group

    def forward(self, x: torch.Tensor, slots) -> torch.Tensor:
        """y = Σ_ranks (W_i x_i + B A_i x_i) + b."""
        y = super().forward(x, slots).contiguous()  # (N, d_out): this rank's partial sum
        dist.all_reduce(y, group=self.group)
        return y if self.out_bias is None else y + self.out_bias


class VocabParallelHead(nn.Module):
    """lm_head split along the vocabulary (padded with zero rows to a multiple of N); one
    all-gather: logits = [x W_0ᵀ | … | x W_{N-1}ᵀ][:, :vocab]."""

    def __init__(self, head: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.vocab, self.world, self.group = head.out_features, tp.world, tp.group
        per = -(-self.vocab // tp.world)
        w = F.pad(head.weight.data, (0, 0, 0, per * tp.world - self.vocab))  # (V', dim)
        self.weight = nn.Parameter(w[tp.rank * per : (tp.rank + 1) * per].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)  # (S, V'/N)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab]  # (S, vocab)


def shard_llama(model: Llama, tp: TensorParallel) -> Llama:
    """Keep rank ``tp.rank``'s shard of every layer of a loaded model (before its adapter bank
    is built): column-parallel layers sliced in place, row-parallel ones and lm_head swapped."""
    check_divisible(model.args, tp.world)
    for name, m in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(m, BankedLinear) and leaf in COLUMN:
            m.shard = Shard(0, tp.rank, tp.world)
            m.weight = nn.Parameter(m.shard.take(m.weight.data, 0), requires_grad=False)  # (d_out/N, d_in)
            if m.bias is not None:
                m.bias = nn.Parameter(m.shard.take(m.bias.data, 0), requires_grad=False)
            m.d_out //= tp.world
        elif isinstance(m, BankedLinear) and leaf in ROW:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, RowParallelLinear(m, tp))
        elif isinstance(m, Attention):
            m.n_heads, m.n_kv_heads = m.n_heads // tp.world, m.n_kv_heads // tp.world
    model.lm_head = VocabParallelHead(model.lm_head, tp)
    return model


@dataclass
class StepEvents:
    """What rank 0 alone sees before a step, for every rank: adapters registered through the
    API (name, path; None: unregistered), new requests (id, prompt ids, sampling, adapter,
    generator seed), aborted and timed-out request ids; or ``stop``."""

    adapters: list[tuple[str, str | None]]
    new: list[tuple[str, list[int], SamplingParams, str | None, int]]
    aborts: set[str]
    timed_out: set[str]
    stop: bool = False


class Stopped(Exception):
    """Rank 0 stopped serving: a worker's engine loop ends."""


def share_step(tp: TensorParallel, incoming: list[Request], aborts: set[str], timed_out: set[str], registry):
    """Rank 0's (incoming, aborts, timed_out) on every rank, its adapter registrations applied
    to every rank's registry first; raises ``Stopped`` once rank 0 has called ``stop_workers``.
    Every request carries a seeded generator (``Engine.add_request``)."""
    events = None
    if tp.rank == 0:
        new = [(r.id, r.prompt_ids, r.params, r.adapter, r.generator.initial_seed()) for r in incoming]
        events = StepEvents(registry.changes, new, aborts, timed_out)
        registry.changes = []
    box = [events]
    dist.broadcast_object_list(box, group=tp.group, group_src=0)
    e: StepEvents = box[0]
    if e.stop:
        raise Stopped
    if tp.rank == 0:
        return incoming, aborts, timed_out
    for name, path in e.adapters:  # rank 0 did the same between its steps: same state, same outcome
        if path is None:
            registry.unregister(name)
        else:
            registry.register(name, path)
    reqs = [
        Request(i, ids, params, adapter, generator=torch.Generator().manual_seed(seed))
        for i, ids, params, adapter, seed in e.new
    ]
    return reqs, e.aborts, e.timed_out


def stop_workers(tp: TensorParallel) -> None:
    """Rank 0: end the workers' ``follow`` loops."""
    dist.broadcast_object_list([StepEvents([], [], set(), set(), stop=True)], group=tp.group, group_src=0)


def follow(engine) -> int:
    """A worker rank's loop: step as rank 0 steps (each step starts with its broadcast) until
    rank 0 calls ``stop_workers``; returns the steps run."""
    steps = 0
    try:
        while True:
            engine.step()
            steps += 1
    except Stopped:
        return steps
