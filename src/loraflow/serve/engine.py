"""The generation engine: continuous batching over a paged KV cache, one adapter per request.

Each ``step()`` runs what the scheduler (``serve/scheduler.py``) plans, up to
``max_batch_tokens`` tokens: first one decode token for every running request, then prompt
chunks (long prompts are cut so decoding keeps flowing) of running and newly admitted
requests. New requests join between steps, finished ones leave and free their KV blocks and
adapter slot at once.

    engine = lf.Engine(model=None, adapters={"sql": "adapters/sql"})
    outs = engine.generate(["Hello", "Hi"], adapters=["sql", None], max_tokens=32, temperature=0.0)
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from loraflow.serve.bank import AdapterBank
from loraflow.serve.detokenizer import Detokenizer
from loraflow.serve.kv_cache import KVCache
from loraflow.serve.llama import Llama, fuse_projections, load_llama
from loraflow.serve.pointwise import Pointwise
from loraflow.serve.registry import AdapterRegistry
from loraflow.serve.request import ERROR_TYPES, ContextTooLong, PromptError, QueueFull, Request, eos_ids
from loraflow.serve.runner import ModelRunner, StepTokens
from loraflow.serve.sampling import NonFiniteLogits, SamplingParams, sample
from loraflow.serve.scheduler import Scheduler
from loraflow.serve.tensor_parallel import TensorParallel, shard_llama, share_step

log = logging.getLogger("loraflow.serve")


class Engine:
    def __init__(
        self,
        model: str | Path | Llama | None = None,
        adapters: dict[str, str] | None = None,
        *,
        adapter_dir: str | Path | None = None,
        device: str | None = None,
        dtype=None,
        tokenizer=None,
        model_name: str | None = None,
        max_batch_tokens: int = 512,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_gpu_adapters: int = 8,
        max_cpu_adapters: int = 64,
        max_lora_rank: int = 64,
        max_waiting: int = 1024,
        decode_graphs: bool | None = None,
        request_timeout: float | None = None,
        tensor_parallel: TensorParallel | None = None,
        compile_pointwise: bool | None = None,
        overlap: bool | None = None,
    ):
        """``tensor_parallel``: this process is one rank of a tensor-parallel engine
        (``serve/tensor_parallel.py``): it holds its shard of the model, and its steps follow
        rank 0's. CUDA graphs stay off then: a captured step would replay its collectives
        without the broadcast that keeps the ranks' plans in step, and NCCL inside graph
        capture needs its own care; ``decode_graphs=True`` is refused. ``compile_pointwise``: the
        model's element-wise work (norms, rotary embeddings, SwiGLU) through ``torch.compile``,
        one fused kernel each (``serve/pointwise.py``); None: on CUDA. ``overlap``: a decode step
        is queued before the previous one's tokens are read (``_chain``); None: on CUDA."""
        from transformers import AutoTokenizer

        from loraflow.models.loading import default_model_path

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if isinstance(model, Llama):  # a model built in memory (benchmarks): bring a tokenizer
            if tokenizer is None:
                raise ValueError("Engine(model=<Llama module>) needs tokenizer=")
            self.model, self.tokenizer, folder = model, tokenizer, None
            self.model_name = model_name or "llama"
        else:
            folder = default_model_path() if model is None else Path(model)
            self.model_name = model_name or ("SmolLM2-135M-Instruct" if model is None else folder.name)
            self.model = load_llama(folder, dtype, "cpu" if tensor_parallel else device)  # shard, then move
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.device = torch.device(device)
        a = self.model.args
        self.tp, n_kv = tensor_parallel, a.n_kv_heads
        if tensor_parallel is not None:
            if decode_graphs:
                raise ValueError("decode_graphs=True under tensor parallelism: leave it unset (False)")
            decode_graphs, n_kv = False, a.n_kv_heads // tensor_parallel.world
            self.model = shard_llama(self.model, tensor_parallel).to(device)
        fuse_projections(self.model)  # q/k/v and gate/up: one GEMM each
        if compile_pointwise is None:
            compile_pointwise = self.device.type == "cuda"
        self.model.pointwise = Pointwise.make(compiled=compile_pointwise)
        self.bank = AdapterBank(self.model, max_gpu_adapters, max_lora_rank)
        self.registry = AdapterRegistry(
            self.bank, max_cpu_adapters, reserved={self.model_name}, synchronous=tensor_parallel is not None
        )
        for name, path in (adapters or {}).items():
            self.registry.register(name, path)
        if adapter_dir is not None:
            self.registry.scan(adapter_dir)
        if tensor_parallel is not None and tensor_parallel.rank == 0:
            self.registry.changes = []  # from now on, what the API registers goes to the other ranks
        if kv_cache_bytes is None:
            kv_cache_bytes = (
                int(0.5 * torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else 512 * 2**20
            )
        self.kv = KVCache(a.n_layers, n_kv, a.head_dim, kv_cache_bytes, block_size, dtype, device)
        self.max_len = min(a.max_seq_len, self.kv.n_blocks * block_size)
        self.max_batch_tokens, self.max_waiting = max_batch_tokens, max_waiting
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds (or None: no limit), got {request_timeout!r}")
        self.request_timeout = request_timeout
        self.vocab_size = self.model.model.embed_tokens.num_embeddings
        self.eos_ids = eos_ids(folder, self.tokenizer)
        self.detokenizer = Detokenizer(self.tokenizer, self.eos_ids)
        self.runner = ModelRunner(
            self.model, self.kv, self.bank, self.device, decode_graphs, max_batch_tokens, self.max_len
        )
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._failed: list[Request] = []
        # running requests whose newest token's text and update wait for the next step's launch
        # (``_flush_text``): on CUDA that host work then overlaps the GPU's forward
        self._pending_text: list[Request] = []
        self.after_notify: Callable[[], None] | None = None  # EngineLoop: hand the updates over at once
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._inflight: StepTokens | None = None  # a decode step queued whose tokens are not yet read
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "failed_steps": 0, "overlapped_steps": 0}
        for kind in ("graph", "decode", "prompt"):  # steps by how they ran (``ModelRunner.forward``)
            self.stats.update({f"{kind}_steps": 0, f"{kind}_step_seconds": 0.0, f"{kind}_step_seconds_max": 0.0})
        self.scheduler = Scheduler(self.kv, self.registry, max_batch_tokens, self.stats)
        self.failures_in_a_row = 0  # steps that raised since the last one that did not

    @property
    def graphs(self):
        """The decode-step CUDA graphs (``serve/decode_graphs.py``), or None."""
        return self.runner.graphs

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    # submitting ------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a text prompt (thread-safe; the server calls it off its event loop)."""
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") has no UTF-8 form
            raise PromptError(
                f"the prompt is not valid Unicode text ({e.reason} at character {e.start}); "
                "send it as UTF-8 without unpaired surrogates"
            ) from None
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        """Raise PromptError for ids the model cannot embed, ContextTooLong for a prompt that
        leaves no room for ``max_tokens`` in the context."""
        if not ids:
            raise PromptError("the prompt is empty: send at least one token")
        bad = next(
            (t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size), None
        )
        if bad is not None:
            raise PromptError(
                f"the prompt holds token id {bad!r}, outside this model's vocabulary: ids must be "
                f"integers in [0, {self.vocab_size})"
            )
        if len(ids) + max_tokens > self.max_len:
            raise ContextTooLong(
                f"this server's context holds {self.max_len} tokens (prompt and output together), but the prompt "
                f"has {len(ids)} tokens and max_tokens is {max_tokens}: shorten the prompt or lower max_tokens "
                f"to at most {max(self.max_len - len(ids), 0)}"
            )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        on_output: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe). Raises KeyError for an unknown adapter, PromptError
        (a ValueError) for a prompt the model cannot run or that does not fit the context with
        ``max_tokens``, QueueFull when the queue is full."""
        params = params or SamplingParams()
        if adapter is not None and not self.registry.known(adapter):
            raise KeyError(adapter)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids, params.max_tokens)
        seed = params.seed
        if seed is None and self.tp is not None:  # every rank draws from a generator seeded alike
            seed = int.from_bytes(os.urandom(8), "big") >> 1
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, adapter, on_output, generator=gen)
        if self.request_timeout is not None:
            req.deadline = req.arrival + self.request_timeout
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

    @property
    def in_flight(self) -> bool:
        """A decode step is queued whose tokens the next ``step()`` reads: the engine is busy
        even when a step returns no request."""
        return self._inflight is not None

    # one step --------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; returns the requests that produced output or finished.

        An error that belongs to one request (its adapter, its logits, its time limit) fails
        that request alone. An error of the step itself (out of memory, a kernel) fails the
        requests in flight with error_type "engine", frees their memory and leaves the queue
        as it was; ``failures_in_a_row`` counts such steps for the caller to give up on."""
        if self.tp is None or self.tp.rank != 0:
            return self._step()
        with self.registry.between_steps:  # the API's adapter (un)registrations wait for the step's end
            return self._step()

    def _step(self) -> list[Request]:
        incoming, aborts, timed_out = self._events()
        self.waiting.extend(incoming)
        quiet = not (incoming or aborts or timed_out or self.waiting)  # the running requests alone
        touched = []
        try:
            if not (quiet and self._chain(touched)):
                touched += self._resolve()
                touched += self._ends(aborts, timed_out)
                plan = self.scheduler.schedule(self._fail)
                touched += self._run(plan) if plan else []
            self.failures_in_a_row = 0
        except Exception as e:
            if self.tp is not None:  # the ranks may have parted mid-collective: no step can follow
                raise
            self.failures_in_a_row += 1
            self.stats["failed_steps"] += 1
            log.exception(
                "engine step failed (%d in a row); failing the %d requests in flight",
                self.failures_in_a_row,
                len(self.running),
            )
            touched += self.fail_all(f"the engine failed: {type(e).__name__}: {e}", waiting=False)
        touched += self._failed
        self._failed = []
        touched = list({id(r): r for r in touched}.values())
        later = {id(r) for r in self._pending_text}  # notified by the next step's ``_flush_text``
        self.notify([r for r in touched if id(r) not in later])
        if not self.running:  # no next launch to hide the text behind
            self._flush_text()
        return touched

    def _ends(self, aborts: set[str], timed_out: set[str]) -> list[Request]:
        """Aborted and timed-out requests, and those whose adapter cannot be served, end."""
        if aborts or timed_out:  # a request's last text before its end
            self._flush_text()
        touched = []
        for r in list(self.running) + list(self.waiting):
            if r.id in aborts:
                touched.append(self._finish(r, "abort"))
            elif r.id in timed_out:
                touched.append(
                    self._fail(
                        r,
                        "timeout",
                        f"the request ran past this server's time limit of "
                        f"{self.request_timeout:g} s (--request-timeout)",
                    )
                )
        for r in list(self.waiting):  # adapters that failed to load, or were unloaded, fail their requests
            why = r.adapter and self.registry.error(r.adapter)
            if why:
                touched.append(self._fail(r, "adapter", f"adapter {r.adapter!r} cannot be served: {why}"))
        return touched

    def _events(self) -> tuple[list[Request], set[str], set[str]]:
        """What changed since the last step: (new requests, ids aborted, ids past their
        deadline); under tensor parallelism rank 0's, on every rank, with its adapters
        registered and unregistered since (``share_step``)."""
        with self._lock:
            incoming = list(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        now = time.perf_counter()
        timed_out = {r.id for r in (*self.running, *self.waiting, *incoming) if now > r.deadline}
        if self.tp is None:
            return incoming, aborts, timed_out
        try:
            return share_step(self.tp, incoming, aborts, timed_out, self.registry)
        except Exception:  # another rank is gone: the new requests stay queued, to be failed with the rest
            with self._lock:
                self._incoming.extendleft(reversed(incoming))
            raise

    def _run(self, plan: list[tuple[Request, int]]) -> list[Request]:
        """The model over the plan's tokens, then one token for each request whose prompt is done.
        A decode graph's step whose rows are all drawn in the batch leaves its tokens on the
        device (with ``overlap``): the next step reads them (``_chain`` or ``_resolve``)."""
        start = time.perf_counter()
        logits, rows, kind = self.runner.forward(plan)  # on CUDA queued: the GPU is busy until ``tokens`` reads
        defer = self.overlap and kind == "graph" and len(rows) == len(plan) and self.runner.chainable(rows)
        if defer:
            self._inflight = self.runner.launch_tokens(logits, rows)
        self._flush_text()  # the previous step's text and updates, meanwhile
        for req, n in plan:
            req.computed += n
        if defer:
            self._count(kind, start)
            return []
        token_of, finite = self.runner.tokens(logits, rows)
        self._accept(rows, token_of, finite, logits)
        self._count(kind, start)
        return [r for _, r in rows]

    def _chain(self, touched: list[Request]) -> bool:
        """The next decode step of the in-flight step's requests, queued before that step's
        tokens are read (they feed it on the device); then those tokens read and accounted for,
        while the GPU runs the new step. False (nothing done) unless the running requests are
        all rows of the in-flight step that go on decoding (none whose token in flight may end it
        by length; a request that ends otherwise, at EOS or a stop string, wastes its next row),
        each with KV room for one more token. Adds the requests that got a token to ``touched``."""
        prev = self._inflight
        if prev is None:
            return False
        go_on = [(row, r) for row, r in prev.rows if not r.finished]
        if len(go_on) != len(self.running) or not all(
            len(r.output_ids) + 1 < r.params.max_tokens and r.n_tokens + 1 < self.max_len for _, r in go_on
        ):
            return False
        full = self.kv.block_size  # a request whose blocks are full needs one more
        if not all(self.kv.grow(r.blocks, r.computed + 1) for _, r in go_on if r.computed >= len(r.blocks) * full):
            return False
        start = time.perf_counter()
        logits = self.runner.decode_after(prev, go_on)
        for _, r in go_on:
            r.computed += 1
        self._inflight = self.runner.launch_tokens(logits, [(i, r) for i, (_, r) in enumerate(go_on)])
        accepted = self._accept(prev.rows, *prev.read())
        notified = {id(r) for r in self._flush_text()}  # their text and updates, while the GPU runs the new step
        touched += [r for r in accepted if id(r) not in notified]  # the finished ones, those with stop strings
        self.stats["overlapped_steps"] += 1
        self._count("graph", start)
        return True

    def _resolve(self) -> list[Request]:
        """The in-flight step's tokens, read and accounted for (nothing queued behind them)."""
        prev, self._inflight = self._inflight, None
        return [] if prev is None else self._accept(prev.rows, *prev.read())

    def _accept(self, rows, token_of: dict, finite: list | None, logits=None) -> list[Request]:
        """Each row's token appended to its request (drawn here from ``logits`` for the rows not
        in ``token_of``), stop conditions checked; the requests returned. A request that ended
        while its step was in flight (an abort, a stop one step earlier) drops its token."""
        accepted = []
        for row, req in rows:
            if req.finished:
                continue
            accepted.append(req)
            try:
                if row in token_of:
                    if not finite[row]:
                        raise NonFiniteLogits(
                            "the model produced non-finite logits (NaN or inf) for this request; "
                            "its adapter's weights are the likely cause"
                        )
                    token, record = token_of[row], None
                else:
                    token, record = sample(logits[row], req.params, req.generator, req.prompt_ids, req.output_ids)
                req.output_ids.append(token)
                if record is not None:
                    req.logprobs.append((token, *record))
                req.first_token_at = req.first_token_at or time.perf_counter()
                self.stats["generated_tokens"] += 1
                self._check_stop(req, token)
            except Exception as e:  # this request's own failure: the others go on
                log.warning("request %s failed while sampling: %s", req.id, e)
                self._fail(req, "request", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))
        return accepted

    def _count(self, kind: str, start: float) -> None:
        self.stats["steps"] += 1
        seconds = time.perf_counter() - start  # the step's model and tokens, host and GPU
        self.stats[f"{kind}_steps"] += 1
        self.stats[f"{kind}_step_seconds"] += seconds
        self.stats[f"{kind}_step_seconds_max"] = max(self.stats[f"{kind}_step_seconds_max"], seconds)

    def notify(self, touched: list[Request]) -> None:
        for req in touched:
            if req.on_output is not None:
                try:
                    req.on_output(req)
                except Exception:  # a consumer's bug must not stop the engine
                    log.exception("on_output of request %s raised", req.id)
        if touched and self.after_notify is not None:
            self.after_notify()

    def _flush_text(self) -> list[Request]:
        """The text of the tokens ``_check_stop`` left pending, and their requests' updates: the
        requests notified."""
        pending, self._pending_text = self._pending_text, []
        live = [r for r in pending if not r.finished]  # a finished request's text is already whole
        self.detokenizer.append_texts(live)
        self.notify(live)
        return live

    def fail_all(self, message: str, waiting: bool = True) -> list[Request]:
        """Fail every running request (and, with ``waiting``, every queued one) with error_type
        "engine", freeing their KV blocks and adapter slots."""
        with self._lock:
            if waiting:
                self.waiting.extend(self._incoming)
                self._incoming.clear()
        self._inflight = None  # its tokens are dropped with their requests
        self._flush_text()
        victims = list(self.running) + (list(self.waiting) if waiting else [])
        return [self._fail(r, "engine", message) for r in victims]

    def _check_stop(self, req: Request, token: int) -> None:
        reason = self.detokenizer.add(req, token, self.max_len)
        if reason is not None:
            self._finish(req, reason)
        elif not req.params.stop:  # its text can wait for the next step's launch
            self._pending_text.append(req)

    def _fail(self, req: Request, error_type: str, message: str) -> Request:
        assert error_type in ERROR_TYPES, error_type
        req.error, req.error_type = message, error_type
        self._failed.append(req)  # reported at the end of this step, wherever it failed
        return self._finish(req, "error")

    def _finish(self, req: Request, reason: str) -> Request:
        req.finish_reason = reason
        self.scheduler.release(req)
        return req

    def stream_text(self, req: Request) -> str:
        """The text safe to show so far (``Detokenizer.stream_text``)."""
        return self.detokenizer.stream_text(req)

    # convenience ---------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], adapters: list[str | None] | None = None, **sampling
    ) -> list[str]:
        """Run requests to completion on the calling thread; returns the texts in order. Any
        number of prompts: beyond ``max_waiting`` they join the queue as it drains."""
        params = SamplingParams(**sampling)
        adapters = adapters or [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        reqs: list[Request] = []
        while len(reqs) < len(prompts) or not all(r.finished for r in reqs):
            while len(reqs) < len(prompts):
                try:
                    reqs.append(self.add_request(prompts[len(reqs)], params, adapters[len(reqs)]))
                except QueueFull:
                    break  # the rest wait for room
            if not self.step() and not self.in_flight:
                time.sleep(0.002)  # waiting for an adapter to load
        bad = [r for r in reqs if r.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"request {bad[0].id} failed: {bad[0].error}")
        return [r.text for r in reqs]
