"""The generation engine: continuous batching over a paged KV cache, one adapter per request.

Each ``step()`` schedules up to ``max_batch_tokens`` tokens: first one decode token for every
running request, then prompt chunks (long prompts are cut so decoding keeps flowing) of
running and newly admitted requests. New requests join between steps, finished ones leave
and free their KV blocks and adapter slot at once.

    engine = lf.Engine(model=None, adapters={"sql": "adapters/sql"})
    outs = engine.generate(["Hello", "Hi"], adapters=["sql", None], max_tokens=32, temperature=0.0)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraflow.serve.bank import AdapterBank
from loraflow.serve.kv_cache import KVCache
from loraflow.serve.decode_graphs import BUCKETS, DecodeGraphs
from loraflow.serve.llama import Batch, Llama, load_llama, paged_decode_attention
from loraflow.serve.packing import pack
from loraflow.serve.registry import AdapterRegistry
from loraflow.serve.sampling import SamplingParams, sample


class QueueFull(Exception):
    """The waiting queue is full: retry later."""


@dataclass(eq=False)          # identity: the scheduler's membership tests stay O(1) per comparison
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    on_output: Callable[["Request"], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None        # "stop" | "length" | "abort" | "error"
    error: str | None = None
    error_type: str | None = None            # "adapter" (it failed to load) | "capacity"
    blocks: list[int] = field(default_factory=list)
    computed: int = 0                        # tokens whose keys and values are cached
    slot: int = -1
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    prefix_offset: int = 0                   # incremental detokenization: output ids[prefix_offset:read_offset]
    read_offset: int = 0                     # were decoded into the tail of ``text``

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _eos_ids(folder: Path | None, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (which may list several)."""
    import json

    ids = {tokenizer.eos_token_id} - {None}
    for name in ("generation_config.json", "config.json") if folder is not None else ():
        if (folder / name).is_file():
            eos = json.loads((folder / name).read_text()).get("eos_token_id")
            ids |= set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
    return ids


class Engine:
    def __init__(self, model: str | Path | Llama | None = None, adapters: dict[str, str] | None = None, *,
                 adapter_dir: str | Path | None = None, device: str | None = None, dtype=None,
                 tokenizer=None, model_name: str | None = None,
                 max_batch_tokens: int = 512, kv_cache_bytes: int | None = None, block_size: int = 16,
                 max_gpu_adapters: int = 8, max_cpu_adapters: int = 64, max_lora_rank: int = 64,
                 max_waiting: int = 1024, decode_graphs: bool | None = None):
        from transformers import AutoTokenizer

        from loraflow.models.loading import default_model_path

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if isinstance(model, Llama):        # a model built in memory (benchmarks): bring a tokenizer
            if tokenizer is None:
                raise ValueError("Engine(model=<Llama module>) needs tokenizer=")
            self.model, self.tokenizer, folder = model, tokenizer, None
            self.model_name = model_name or "llama"
        else:
            folder = default_model_path() if model is None else Path(model)
            self.model_name = model_name or ("SmolLM2-135M-Instruct" if model is None else folder.name)
            self.model = load_llama(folder, dtype, device)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.device = torch.device(device)
        a = self.model.args
        self.bank = AdapterBank(self.model, max_gpu_adapters, max_lora_rank)
        self.registry = AdapterRegistry(self.bank, max_cpu_adapters)
        for name, path in (adapters or {}).items():
            self.registry.register(name, path)
        if adapter_dir is not None:
            self.registry.scan(adapter_dir)
        if kv_cache_bytes is None:
            kv_cache_bytes = (int(0.5 * torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda"
                              else 512 * 2**20)
        self.kv = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, kv_cache_bytes, block_size, dtype, device)
        self.max_len = min(a.max_seq_len, self.kv.n_blocks * block_size)
        self.max_batch_tokens, self.max_waiting = max_batch_tokens, max_waiting
        self.eos_ids = _eos_ids(folder, self.tokenizer)
        # streaming decodes a few ids per request and step: straight to the Rust tokenizer
        # (transformers' wrapper costs ~30 us a call) when its clean-up step would not change the text
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False)
        self._window_decode = backend.decode if plain else self.tokenizer.decode
        if decode_graphs is None:
            decode_graphs = self.device.type == "cuda" and paged_decode_attention is not None
        self.graphs = (DecodeGraphs(self.model, self.kv, self.bank, min(max_batch_tokens, BUCKETS[-1]), self.max_len,
                                    capture=self.device.type == "cuda") if decode_graphs else None)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0}

    # submitting ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None,
                    on_output: Callable[[Request], None] | None = None) -> Request:
        """Queue a request (thread-safe). Raises KeyError for an unknown adapter, ValueError
        for a prompt that does not fit the context, QueueFull when the queue is full."""
        params = params or SamplingParams()
        if adapter is not None and not self.registry.known(adapter):
            raise KeyError(adapter)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + 1 > self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this server's context holds {self.max_len} "
                             "(prompt and output together)")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, adapter, on_output, generator=gen)
        with self._lock:
            if len(self.waiting) + len(self._incoming) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting")
            self._incoming.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its KV blocks and adapter slot are freed next step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._incoming or self._aborts)

    # one step --------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; returns the requests that produced output or finished."""
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        touched = [self._finish(r, "abort") for r in list(self.running) + list(self.waiting) if r.id in aborts]
        for r in list(self.waiting):        # adapters that failed to load fail their requests
            if r.adapter and self.registry.error(r.adapter):
                r.error = f"adapter {r.adapter!r} cannot be served: {self.registry.error(r.adapter)}"
                r.error_type = "adapter"
                touched.append(self._finish(r, "error"))
        plan = self._schedule()
        if not plan:
            return [r for r in touched if r]
        if self.graphs is not None and len(plan) <= self.graphs.size and all(n == 1 for _, n in plan):
            logits = self.graphs.run([(r.token(r.computed), r.computed, r.slot, r.blocks) for r, _ in plan])
            rows = [(i, r) for i, (r, _) in enumerate(plan) if r.computed + 1 == r.n_tokens]
        else:
            batch, sample_from = self._batch(plan)
            with torch.inference_mode():
                logits = self.model(batch, self.kv.layers)
            rows = list(enumerate(sample_from))
        for req, n in plan:
            req.computed += n
        greedy = logits.argmax(-1).tolist() if any(r.params.temperature == 0 for _, r in rows) else None
        for row, req in rows:
            token = greedy[row] if req.params.temperature == 0 else sample(logits[row], req.params, req.generator)
            req.output_ids.append(token)
            req.first_token_at = req.first_token_at or time.perf_counter()
            self.stats["generated_tokens"] += 1
            self._check_stop(req, token)
            touched.append(req)
        self.stats["steps"] += 1
        for req in touched:
            if req is not None and req.on_output is not None:
                req.on_output(req)
        return [r for r in touched if r]

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.max_batch_tokens
        plan, planned = [], set()
        for req in sorted(self.running, key=lambda r: r.n_tokens - r.computed):   # decodes first
            if budget <= 0:
                break
            if req not in self.running:       # preempted below for an earlier request
                continue
            n = min(req.n_tokens - req.computed, budget)
            while not self.kv.grow(req.blocks, req.computed + n):
                victims = [r for r in reversed(self.running) if r is not req and r.id not in planned]
                if not victims:
                    req.error = "out of KV-cache memory for this request"
                    req.error_type = "capacity"
                    self._finish(req, "error")
                    break
                self._preempt(victims[0])
            if req.finished:
                continue
            plan.append((req, n))
            planned.add(req.id)
            budget -= n
        for req in list(self.waiting):
            if budget <= 0:
                break
            if req.adapter is not None:
                slot = self.registry.acquire(req.adapter)
                if slot is None:         # still loading, or every slot busy: others go first
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

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and slot; it is recomputed when readmitted."""
        self.running.remove(req)
        self.kv.release(req.blocks)
        req.computed = 0
        if req.adapter is not None:
            self.registry.release(req.adapter)
            req.slot = -1
        self.waiting.appendleft(req)

    def _batch(self, plan) -> tuple[Batch, list[Request]]:
        """The step's packed tokens and attention metadata (``serve/packing.py``)."""
        return pack(plan, self.bank, self.kv.block_size, self.device, self.model.lm_head.weight.dtype)

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        if token in self.eos_ids and not p.ignore_eos:
            req.output_ids.pop()
            req.text = self._decode(req)
            self._finish(req, "stop")
            return
        self._append_text(req)
        for s in p.stop:
            at = req.text.find(s)
            if at >= 0:
                req.text = req.text[:at]
                self._finish(req, "stop")
                return
        if len(req.output_ids) >= p.max_tokens or req.n_tokens >= self.max_len:
            req.text = self._decode(req)
            self._finish(req, "length")

    def _append_text(self, req: Request) -> None:
        """Extend ``req.text`` by the new token's text, decoding only a short window: the
        text of ids[prefix:] minus that of ids[prefix:read] (a token's text can depend on its
        neighbours), held back while it ends in an unfinished multi-byte character."""
        ids, decode = req.output_ids, self._window_decode
        before = decode(ids[req.prefix_offset:req.read_offset], skip_special_tokens=True)
        after = decode(ids[req.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            req.text += after[len(before):]
            req.prefix_offset, req.read_offset = req.read_offset, len(ids)

    def _decode(self, req: Request) -> str:
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=True)

    def _finish(self, req: Request, reason: str) -> Request:
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.blocks:
            self.kv.release(req.blocks)
        if req.slot >= 0 and req.adapter is not None:
            self.registry.release(req.adapter)
            req.slot = -1
        return req

    def stream_text(self, req: Request) -> str:
        """The text safe to show so far: holds back what could still become a stop string
        or an unfinished multi-byte character."""
        if req.finished:
            return req.text
        hold = max((len(s) - 1 for s in req.params.stop), default=0)
        text = req.text[:len(req.text) - hold] if hold else req.text
        return text.rstrip("\ufffd")

    # convenience ---------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], adapters: list[str | None] | None = None,
                 **sampling) -> list[str]:
        """Run requests to completion on the calling thread; returns the texts in order."""
        params = SamplingParams(**sampling)
        adapters = adapters or [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        reqs = [self.add_request(p, params, a) for p, a in zip(prompts, adapters)]
        while not all(r.finished for r in reqs):
            if not self.step():
                time.sleep(0.002)     # waiting for an adapter to load
        bad = [r for r in reqs if r.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"request {bad[0].id} failed: {bad[0].error}")
        return [r.text for r in reqs]
