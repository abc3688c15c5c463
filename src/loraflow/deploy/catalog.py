"""The catalog: one small Serve deployment that every replica hears from and reports to.

Ray Serve routes each request to one replica and has no call that reaches them all, so what
must reach every replica goes through here:

- **Adapter changes at run time.** ``/v1/load_lora_adapter`` and ``unload`` are checked and
  done on one replica (``serve/api.py``'s own routes), then recorded here as a numbered
  change (name -> folder, or None: unloaded). Every replica long-polls the catalog
  (``poll``) and applies the changes it has not applied yet; the router answers the client
  once every replica has (``wait_applied``). A replica that starts later, a replacement for
  one that died included, applies them all before it serves.
- **Each replica's metrics.** Every poll carries the replica's ``/metrics`` page and routing
  counters; the router's ``/metrics`` asks every replica for a new report first (``fresh``:
  the waiting polls return at once, and the replicas poll again with new pages), and
  ``/health`` counts the live ones (``live``).

A replica that has not polled for ``stale_s`` counts as gone; so does one late by
``overdue_s`` whose Ray actor no longer exists (killed, crashed: ``actor_gone``), at once. The
changes live in this
process's memory: if the catalog's own replica is replaced, replicas keep what they applied,
but one that starts afterwards knows only the adapters of the command line."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class ReplicaReport:
    replica: str  # Serve's id of the replica (the ``replica`` label of /metrics)
    actor: str  # the name of its Ray actor (ray.util.list_named_actors, namespace "serve")
    version: int  # the last catalog version it has applied whole
    metrics: str  # its /metrics page (Prometheus text) with its routing counters
    base_model: str
    epoch: int = 0  # the catalog's refresh epoch when the report was made (``fresh``)
    seen: float = 0.0  # time.monotonic() when the catalog last heard from it


@dataclass
class Change:
    version: int
    path: str | None  # None: unloaded
    origin: str | None  # the replica that already made it (checked and applied the request)


class Catalog:
    def __init__(self, stale_s: float = 5.0, overdue_s: float | None = None, gone=None):
        """``gone(actor_name) -> bool`` is asked about a replica not heard from for ``overdue_s``."""
        self.stale_s, self.overdue_s, self.gone = stale_s, overdue_s or stale_s, gone
        self.version = 0
        self.epoch = 0  # bumped by ``fresh``: every replica reports again
        self.changes: dict[str, Change] = {}  # each adapter's latest change
        self.reports: dict[str, ReplicaReport] = {}
        self.base_model: str | None = None
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made on the event loop that serves the calls
            self._cond = asyncio.Condition()
        return self._cond

    async def poll(self, report: ReplicaReport, wait_s: float) -> tuple[int, dict[str, Change], int]:
        """A replica's heartbeat: record its report; answer the latest version, the changes newer
        than the replica's and the refresh epoch, at once if there are changes or a refresh is
        asked for, else when one comes or after ``wait_s``."""
        report.seen = time.monotonic()
        self.reports[report.replica] = report
        self.base_model = self.base_model or report.base_model
        cond = self._condition()
        async with cond:
            cond.notify_all()  # wait_applied and fresh look again
            behind = lambda: self.version > report.version or self.epoch > report.epoch  # noqa: E731
            if wait_s > 0 and not behind():
                try:
                    await asyncio.wait_for(cond.wait_for(behind), wait_s)
                except TimeoutError:
                    pass
        changes = {n: c for n, c in self.changes.items() if c.version > report.version}
        return self.version, changes, self.epoch

    async def change(self, name: str, path: str | None, origin: str | None) -> int:
        """Record that ``name`` now serves ``path`` (None: it is unloaded); the new version."""
        cond = self._condition()
        async with cond:
            self.version += 1
            self.changes[name] = Change(self.version, path, origin)
            cond.notify_all()
        return self.version

    async def wait_applied(self, version: int, timeout_s: float) -> list[str]:
        """Wait until every live replica has applied ``version``; the replicas that still have
        not after ``timeout_s`` (empty: all have)."""
        deadline = time.monotonic() + timeout_s
        cond = self._condition()
        async with cond:
            while True:
                pending = sorted(r.replica for r in self.live() if r.version < version)
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return pending
                try:  # woken by each poll; staleness is looked at again every half second
                    await asyncio.wait_for(cond.wait(), min(left, 0.5))
                except TimeoutError:
                    pass

    async def fresh(self, timeout_s: float) -> list[ReplicaReport]:
        """Every live replica's report made after this call (or its latest, for one that has not
        answered within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        cond = self._condition()
        async with cond:
            self.epoch += 1
            epoch = self.epoch
            cond.notify_all()
            while any(r.epoch < epoch for r in self.live()) and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(cond.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    pass
        return self.live()

    async def leave(self, replica: str) -> None:
        """A replica that stops: it no longer counts (draining ends with this)."""
        self.reports.pop(replica, None)
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def live(self) -> list[ReplicaReport]:
        now = time.monotonic()
        for rid, rep in list(self.reports.items()):
            late = now - rep.seen
            if late > self.stale_s or (late > self.overdue_s and self.gone is not None and self.gone(rep.actor)):
                del self.reports[rid]
        return sorted(self.reports.values(), key=lambda r: r.replica)

    async def describe(self) -> dict:
        """The base model's name, the catalog's version and the live replicas' reports."""
        return {"base_model": self.base_model, "version": self.version, "replicas": self.live()}


def actor_gone(name: str) -> bool:
    """Whether Ray no longer has the named actor of Serve's namespace (it died for good)."""
    import ray

    if not name:  # not known: only staleness tells
        return False
    try:
        ray.get_actor(name, namespace="serve")
    except ValueError:
        return True
    return False
