"""The scheduler: which requests run in a step, and with how many tokens.

Decodes first (one token each), then prompt chunks of running requests and of newly admitted
ones, up to ``max_batch_tokens``. Admission takes the request's KV blocks and adapter slot
(an adapter still loading, or no free slot: the request waits and later ones may go first);
a running request that needs blocks preempts the latest-admitted others, which give their
blocks and slot back and are recomputed when readmitted. ``release`` gives them back when a
request ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from loraflow.serve.kv_cache import KVCache
from loraflow.serve.registry import AdapterRegistry
from loraflow.serve.request import Request


class Scheduler:
    def __init__(self, kv: KVCache, registry: AdapterRegistry, max_batch_tokens: int, stats: dict):
        self.kv, self.registry, self.max_batch_tokens = kv, registry, max_batch_tokens
        self.stats = stats  # the engine's counters: admission adds "prompt_tokens", preemption "preemptions"
        stats.setdefault("preemptions", 0)
        # how many waiting requests a step may pass over (their adapters loading or the bank's
        # slots all held) before it stops looking: loads start only for the queue's head, so
        # with many distinct adapters they are not evicted from host memory before their turn
        self.lookahead = max(4, min(registry.max_cpu // 2, 2 * registry.bank.n_slots))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def schedule(self, fail: Callable[[Request, str, str], object]) -> list[tuple[Request, int]]:
        """(request, tokens) of the next step within ``max_batch_tokens``: one token for each
        decoding request, then prompt chunks of running and newly admitted ones. A request that
        cannot get KV blocks even after preempting every other is failed through ``fail``."""
        budget = self.max_batch_tokens
        plan, planned, preempted = [], set(), set()
        for req in sorted(self.running, key=lambda r: r.n_tokens - r.computed):  # decodes first
            if budget <= 0:
                break
            if req.id in preempted:  # for an earlier request, below
                continue
            n = min(req.n_tokens - req.computed, budget)
            while not self.kv.grow(req.blocks, req.computed + n):
                victims = [r for r in reversed(self.running) if r is not req and r.id not in planned]
                if not victims:
                    fail(req, "capacity", "out of KV-cache memory for this request")
                    break
                self.preempt(victims[0])
                preempted.add(victims[0].id)
            if req.finished:
                continue
            plan.append((req, n))
            planned.add(req.id)
            budget -= n
        passed_over = 0  # waiting requests whose adapter is not ready
        for req in list(self.waiting):
            if budget <= 0 or passed_over >= self.lookahead:
                break
            if req.adapter is not None:
                slot = self.registry.acquire(req.adapter)  # starts loading it, if it is not in memory
                if slot is None:  # still loading, or every slot busy: others go first
                    passed_over += 1
                    continue
                req.slot = slot
            n = min(len(req.ids) - req.computed, budget)
            if not self.kv.grow(req.blocks, req.computed + n):
                if req.adapter is not None:
                    self.registry.release(req.adapter)
                    req.slot = -1
                break
            self.waiting.remove(req)
            self.running.append(req)
            if req.computed == 0 and not req.output_ids:
                self.stats["prompt_tokens"] += len(req.prompt_ids)
            plan.append((req, n))
            budget -= n
        return plan

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and slot; it is recomputed when readmitted."""
        self.running.remove(req)
        self.kv.release(req.blocks)
        req.computed = 0
        self.stats["preemptions"] += 1
        if req.adapter is not None:
            self.registry.release(req.adapter)
            req.slot = -1
        self.waiting.appendleft(req)

    def release(self, req: Request) -> None:
        """A request ended: out of the queues, its KV blocks and adapter slot given back."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.blocks:
            self.kv.release(req.blocks)
        if req.slot >= 0 and req.adapter is not None:
            self.registry.release(req.adapter)
            req.slot = -1
