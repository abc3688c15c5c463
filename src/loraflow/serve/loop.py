"""The engine on its own thread, and the bridge from its outputs to asyncio handlers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from loraflow.serve.engine import Engine, Request
from loraflow.serve.sampling import SamplingParams

log = logging.getLogger("loraflow.serve")
HEARTBEAT_S = 60.0


class EngineDown(Exception):
    """The engine gave up after failing step after step: the process is exiting."""


@dataclass
class Update:
    """A snapshot of a request after one engine step, safe to hand to another thread."""

    text: str
    finished: bool
    finish_reason: str | None
    error: str | None
    error_type: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list  # the request's records so far (append-only; read up to completion_tokens)
    ttft: float | None  # seconds from arrival to the first token


class EngineLoop:
    """Runs ``engine.step()`` while there is work: on a background thread, or, with
    ``background=False``, on the caller's thread through ``run_forever()``.

    ``loraflow serve`` runs the engine on the main thread (the one that built it) and the
    HTTP server on a secondary one: on the CPU, PyTorch's OpenMP work from a second thread,
    while the first thread's OpenMP team is alive, ran 2-3x slower (threads beyond the
    cores make libgomp sleep between parallel regions instead of spinning).

    Failures: a request's own error fails that request (``Engine.step``). A step that fails
    as a whole fails the requests in flight (HTTP 503) and the engine goes on with the
    queue; after ``max_failures`` such steps in a row it fails every request, and
    ``run_forever`` raises ``EngineDown``, so that ``loraflow serve`` exits non-zero for a
    supervisor to restart it (the device may be in a state no retry mends)."""

    def __init__(self, engine: Engine, background: bool = True, max_failures: int = 3):
        self.engine, self.max_failures = engine, max_failures
        self.down: str | None = None
        self._wake = threading.Event()
        self._stop = False
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, Update]] = []  # this step's updates
        self._thread = None
        engine.after_notify = self._deliver  # updates leave mid-step too (``Engine._flush_text``)
        if background:
            self._thread = threading.Thread(target=self.run_forever, name="engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        engine, last = self.engine, time.monotonic()
        while not self._stop:
            # under tensor parallelism an idle rank 0 still steps now and then: the workers wait
            # for each step's broadcast, and a wait past the process group's timeout fails
            if engine.has_work() or (engine.tp is not None and time.monotonic() - last > HEARTBEAT_S):
                try:
                    touched, last = engine.step(), time.monotonic()
                except Exception as e:  # only under tensor parallelism (``Engine.step``)
                    log.exception("a tensor-parallel engine step failed")
                    raise self._give_up(
                        f"a tensor-parallel step failed ({type(e).__name__}: {e}); the processes cannot go on together"
                    ) from e
                if engine.failures_in_a_row >= self.max_failures:
                    raise self._give_up(f"the engine failed {engine.failures_in_a_row} steps in a row and stopped")
                self._deliver()
                if not touched and not engine.in_flight:
                    time.sleep(0.002)  # only requests whose adapter is still loading
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def _give_up(self, why: str) -> EngineDown:
        """Fail every request (503) and return the EngineDown to raise."""
        self.down = why
        self.engine.notify(self.engine.fail_all(why + "; retry once the server is back"))
        self._deliver()
        return EngineDown(why)

    def submit(
        self,
        prompt,
        params: SamplingParams,
        adapter: str | None,
        request_id: str | None = None,
        final_only: bool = False,
    ) -> tuple[Request, asyncio.Queue]:
        """Queue a request; its updates arrive on the returned asyncio queue (of this loop):
        one per step that advanced it, or with ``final_only`` only the last."""
        if self.down:
            raise EngineDown(self.down)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Update] = asyncio.Queue()
        engine = self.engine

        def on_output(req: Request) -> None:  # engine thread, inside step()
            if final_only and not req.finished:
                return
            ttft = req.first_token_at - req.arrival if req.first_token_at is not None else None
            update = Update(
                engine.stream_text(req),
                req.finished,
                req.finish_reason,
                req.error,
                req.error_type,
                len(req.prompt_ids),
                len(req.output_ids),
                req.logprobs,
                ttft,
            )
            self._outbox.append((loop, queue, update))

        req = engine.add_request(prompt, params, adapter, request_id=request_id, on_output=on_output)
        self._wake.set()
        return req, queue

    def _deliver(self) -> None:
        """Hand a step's updates to their event loops: one wake-up per loop and step, not
        one per request (each wake-up is a write to the loop's self-pipe and a pass of it)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, queue, update in outbox:
            by_loop.setdefault(loop, []).append((queue, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                log.warning("dropped %d updates for a closed event loop", len(items))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def stop(self) -> None:
        """Make ``run_forever`` return (safe from signal handlers and other threads)."""
        self._stop = True
        self._wake.set()

    def close(self) -> None:
        """Stop the engine and answer what is still in flight (503, "shutting down"), so that
        streams end with an error event and the HTTP server's graceful stop need not wait."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._thread is None or not self._thread.is_alive():  # no step runs: the engine is ours
            self.engine.notify(self.engine.fail_all("the server is shutting down; retry once it is back"))
            self._deliver()
        self.engine.registry.close()


def _put_all(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for queue, update in items:
        queue.put_nowait(update)
