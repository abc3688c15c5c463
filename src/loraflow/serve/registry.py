"""Adapters known by name, in three tiers: disk (a path), host memory (factors on the CPU,
LRU, ``max_cpu``) and device slots of the bank (LRU, ``max_gpu``).

Loading from disk runs on a background thread, so requests for other adapters keep
decoding; a request waits until its adapter is in host memory, then takes a device slot
(evicting the least recently used adapter that no running request holds). An adapter that
fails to load fails only the requests that asked for it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loraflow.adapters.files import (
    CONFIG_NAME,
    PICKLE_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    adapter_from_file,
    read_adapter,
)
from loraflow.adapters.kinds import KINDS, kind_named
from loraflow.serve.bank import AdapterBank

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class AdapterError(Exception):
    """An adapter that cannot be served (unknown, malformed, or not for this base model)."""


class SlotFactors(dict):
    """module name -> (A (r, d_in), C (d_out, r)): an adapter as the bank holds it; C = scale·B
    for additive kinds, C = B / r for multiplicative ones (``multiplicative`` True)."""

    multiplicative: bool = False


def factors_for_bank(
    path: Path, shapes: dict[str, tuple[int, int]], r_max: int, name: str | None = None
) -> SlotFactors:
    """An adapter's factors on the CPU, checked against the model: the additive ones (LoRA,
    Deep LoRA) or the multiplicative ones (FLoRA) of its kind (``adapters/kinds.py``).

    Every refusal is an AdapterError whose message names the adapter (``name``, default the
    folder's name) and the file by its base name, never the server's paths: it goes to the
    clients (a 400 at ``/v1/load_lora_adapter`` or on a request)."""
    path = Path(path)
    name = name if name is not None else path.name
    check_servable(name, path)
    try:
        config, by_module = read_adapter(path)
    except AdapterFileError as e:
        raise AdapterError(e.brief(name)) from e
    except OSError as e:  # unreadable: permissions, I/O
        why = e.strerror or type(e).__name__
        raise AdapterError(f"adapter {name!r}: its files cannot be read on the server ({why})") from e
    kind = kind_named(config.kind)
    if kind.additive is None and kind.multiplicative is None:
        served = [k.peft_type for k in KINDS.values() if k.additive or k.multiplicative]
        raise AdapterError(f"adapter {name!r} is {config.kind}: the server serves {served}")
    out = SlotFactors()
    out.multiplicative = kind.additive is None
    for module, found in by_module.items():
        if module not in shapes:
            raise AdapterError(
                f"adapter {name!r}: layer {module} is not a linear layer of the served "
                "model; it was trained for another base model"
            )
        d_out, d_in = shapes[module]
        try:
            adapter = adapter_from_file(config, module, d_in, d_out, found)
        except ValueError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from e
        with torch.no_grad():
            if out.multiplicative:
                a, b = (t.detach().float() for t in kind.multiplicative(adapter))
            else:
                a, b, scale, _ = kind.additive(adapter)
                a, b = a.detach().float(), scale * b.detach().float()
        if a.shape[0] > r_max:
            raise AdapterError(
                f"adapter {name!r} has rank {a.shape[0]} on {module}, above the server's --max-lora-rank {r_max}"
            )
        out[module] = (a, b)
    return out


def check_servable(name: str, path: str | Path) -> None:
    """Refuse (AdapterError) an adapter that a causal-LM server cannot serve whatever its
    weights: a classifier that ``loraflow finetune --task classification`` wrote, whose
    adapter_config.json lists trained modules (``modules_to_save``: its ``score`` head) or says
    ``task_type: SEQ_CLS``. Reads the config only; a missing or unreadable one is left for the
    load to report."""
    try:
        fields = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(fields, dict):
        return
    saved, task = fields.get("modules_to_save") or [], fields.get("task_type")
    if saved or task == "SEQ_CLS":
        what = f"trained modules {saved} (modules_to_save)" if saved else f"task_type {task!r}"
        raise AdapterError(
            f"adapter {name!r} is a classifier: its {CONFIG_NAME} lists {what}, a classification head that this "
            "causal-LM server has no place for. Score it with `loraflow eval --adapter FOLDER`, or serve an "
            "adapter trained with `loraflow finetune --task causal-lm`"
        )


def files_identity(path: Path) -> tuple:
    """What changes when an adapter folder's files are written again: (inode, size, mtime_ns)
    of the folder and of each of its files (None for a missing one)."""
    found = []
    for p in (path, path / CONFIG_NAME, path / WEIGHTS_NAME, path / PICKLE_NAME):
        try:
            st = p.stat()
            found.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            found.append(None)
    return tuple(found)


class AdapterRegistry:
    """Thread-safe: the HTTP thread registers and unregisters, the engine thread acquires and
    releases, the loader threads fill host memory. Only the engine thread writes the bank.

    ``synchronous``: an adapter loads from disk inside the ``acquire`` that first needs it, on
    the engine's thread, not on a loader thread: under tensor parallelism every rank's
    scheduler then sees it ready at the same step (a step waits for the read)."""

    def __init__(
        self, bank: AdapterBank, max_cpu: int = 64, reserved: set[str] = frozenset(), synchronous: bool = False
    ):
        self.bank, self.max_cpu, self.reserved, self.synchronous = bank, max_cpu, set(reserved), synchronous
        # tensor parallelism: each step holds ``between_steps`` (registrations fall between steps)
        # and rank 0 records them in ``changes`` ((name, path; None: unregistered)) for the others
        self.between_steps = threading.Lock()
        self.changes: list[tuple[str, str | None]] | None = None
        self.shapes = bank.shapes()
        self.paths: dict[str, Path] = {}
        self.host: OrderedDict[str, dict] = OrderedDict()
        self.device: OrderedDict[str, int] = OrderedDict()
        self.free_slots = list(range(bank.n_slots - 1, -1, -1))
        self.pins: Counter = Counter()
        self.loading: dict = {}
        self.versions: Counter = Counter()  # bumped by each (re-)registration: a load of an older one is dropped
        self.errors: dict[str, str] = {}
        self.failed_files: dict[str, tuple] = {}  # name -> files_identity of the files that failed to load
        # load_seconds: disk to host memory (loader threads); slot_write_seconds: the engine thread's
        # share of host memory to a device slot (on CUDA, queuing the copies)
        self.stats = Counter(hits=0, misses=0, loads=0, evictions=0, load_failures=0, slot_writes=0)
        self.stats.update(load_seconds=0.0, slot_write_seconds=0.0)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")

    # names and paths -----------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Serve the adapter folder ``path`` as ``name``. Registering a known name again (another
        path, or new files at the same path) drops its copies in host memory and on the device,
        so later requests get the new weights; refused while requests use it."""
        if not NAME.match(name or ""):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
        if name in self.reserved:
            raise AdapterError(f"{name!r} is the base model's name: choose another name for the adapter")
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise AdapterError(f"{path} is not an adapter folder (no {CONFIG_NAME})")
        check_servable(name, path)
        with self.between_steps, self._lock:
            if self.pins[name]:
                raise AdapterError(
                    f"adapter {name!r} is in use by running requests; register it again "
                    "once they finish, or under another name"
                )
            if self.changes is not None:
                self.changes.append((name, str(path)))
            self.paths[name] = path
            self.versions[name] += 1
            self.errors.pop(name, None)
            self.failed_files.pop(name, None)
            self.host.pop(name, None)
            self.loading.pop(name, None)
            slot = self.device.pop(name, None)
            if slot is not None:
                self.free_slots.append(slot)

    def scan(self, folder: str | Path) -> int:
        """Register every adapter folder directly under ``folder`` by its folder name; one the
        server cannot serve (a classifier) is skipped with a warning in the log."""
        n = 0
        for sub in sorted(Path(folder).iterdir()):
            if (sub / CONFIG_NAME).is_file() and NAME.match(sub.name):
                try:
                    check_servable(sub.name, sub)
                except AdapterError as e:
                    log.warning("skipping %s: %s", sub.name, e)
                    continue
                self.register(sub.name, sub)
                n += 1
        return n

    def unregister(self, name: str) -> None:
        with self.between_steps, self._lock:
            if name not in self.paths:
                raise KeyError(name)
            if self.pins[name]:
                raise AdapterError(f"adapter {name!r} is in use by running requests; try again later")
            if self.changes is not None:
                self.changes.append((name, None))
            del self.paths[name]
            self.versions[name] += 1
            self.host.pop(name, None)
            self.errors.pop(name, None)
            self.failed_files.pop(name, None)
            self.loading.pop(name, None)
            slot = self.device.pop(name, None)
            if slot is not None:  # the next adapter written there overwrites every row of it
                self.free_slots.append(slot)

    def known(self, name: str) -> bool:
        return name in self.paths

    def resident(self, name: str) -> bool:
        """Whether ``name`` is in host memory or on the device now: a request for it would need
        no read from disk (``loraflow.deploy`` counts each replica's requests served so)."""
        with self._lock:
            return name in self.host or name in self.device

    # tiers ------------------------------------------------------------------------------
    def _load(self, name: str, path: Path, version: int) -> None:
        identity = files_identity(path)  # before reading: files changed meanwhile are read again
        start = time.perf_counter()
        try:
            factors = self._host_copy(factors_for_bank(path, self.shapes, self.bank.r_max, name))
        except Exception as e:  # any failure fails only this adapter's requests
            with self._lock:
                if self.versions[name] == version:
                    self.errors[name] = str(e) if isinstance(e, AdapterError) else f"{type(e).__name__}: {e}"
                    self.failed_files[name] = identity
                    self.stats["load_failures"] += 1
                    self.loading.pop(name, None)
            return
        with self._lock:
            if self.versions[name] != version:  # unloaded or re-registered meanwhile
                return
            self.host[name] = factors
            self.host.move_to_end(name)
            while len(self.host) > self.max_cpu:
                self.host.popitem(last=False)
            self.stats["loads"] += 1
            self.stats["load_seconds"] += time.perf_counter() - start
            self.loading.pop(name, None)

    def _host_copy(self, factors: SlotFactors) -> SlotFactors:
        """The factors in the bank's dtype, in page-locked memory when the bank is on CUDA: the
        engine thread's copy to a slot is then queued on the stream (``AdapterBank.write``)
        instead of waiting for the step in flight, as a copy from pageable memory does."""
        out = SlotFactors()
        out.multiplicative = factors.multiplicative
        pin = self.bank.device.type == "cuda"
        for module, (a, c) in factors.items():
            a, ct = a.to(self.bank.dtype).contiguous(), c.to(self.bank.dtype).T.contiguous()  # the bank holds Cᵀ
            out[module] = (a.pin_memory(), ct.pin_memory().T) if pin else (a, ct.T)
        return out

    def error(self, name: str) -> str | None:
        """Why ``name`` cannot be served (it failed to load, or was unloaded), or None. Called
        for every waiting request each step: two dict reads without the lock (each is atomic;
        a change between them is seen at the next step).

        A failure holds only while the files that failed are there: once they are written
        again (another inode, size or mtime: the adapter was saved again, fixed), the failure
        is forgotten and the next request loads the new files, without a restart."""
        if name not in self.paths:
            return "it was unloaded"
        why = self.errors.get(name)
        if why is not None and self._files_changed(name):
            return None
        return why

    def _files_changed(self, name: str) -> bool:
        """True, forgetting ``name``'s failure, when its files are no longer those that failed."""
        path, failed = self.paths.get(name), self.failed_files.get(name)
        if path is None or failed is None or files_identity(path) == failed:
            return False
        with self._lock:
            if self.failed_files.get(name) is failed:  # not re-registered nor failed again meanwhile
                self.errors.pop(name, None)
                self.failed_files.pop(name, None)
        return True

    def acquire(self, name: str) -> int | None:
        """A device slot holding ``name``, pinned until ``release``; None while it loads or
        while every slot is pinned. Called from the engine's thread only."""
        with self._lock:
            load = self.synchronous and name not in self.device and name not in self.host and name not in self.errors
            path, version = self.paths.get(name), self.versions[name]
        if load and path is not None:
            self.stats["misses"] += 1
            self._load(name, path, version)  # on this thread: the host copy, or errors[name]
        with self._lock:
            if name in self.device:
                self.device.move_to_end(name)
                self.pins[name] += 1
                self.stats["hits"] += 1
                return self.device[name]
            if name in self.errors or name not in self.paths:  # the engine fails its requests
                return None
            factors = self.host.get(name)
            if factors is None:
                # at most half the host cache loading at once: with more requests for distinct
                # adapters than it holds, loads would evict each other before their requests ran
                # (benchmarks/results/many-adapters-cpu.txt)
                if name not in self.loading and len(self.loading) < max(1, self.max_cpu // 2):
                    self.stats["misses"] += 1
                    self.loading[name] = self._pool.submit(self._load, name, self.paths[name], self.versions[name])
                return None
            self.host.move_to_end(name)
            if not self.free_slots:
                victim = next((n for n in self.device if not self.pins[n]), None)
                if victim is None:
                    return None
                self.free_slots.append(self.device.pop(victim))
                self.stats["evictions"] += 1
            slot = self.free_slots.pop()
            self.device[name] = slot
            self.pins[name] += 1
        start = time.perf_counter()
        try:
            self.bank.write(slot, factors, multiplicative=factors.multiplicative)
        except BaseException:  # e.g. out of device memory: the slot holds nothing usable
            with self._lock:
                self.pins[name] -= 1
                if self.device.get(name) == slot:
                    del self.device[name]
                    self.free_slots.append(slot)
            raise
        with self._lock:
            self.stats["slot_writes"] += 1
            self.stats["slot_write_seconds"] += time.perf_counter() - start
        return slot

    def release(self, name: str) -> None:
        with self._lock:
            self.pins[name] -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "registered": len(self.paths),
                "host": len(self.host),
                "device": len(self.device),
                "loading": len(self.loading),
                **self.stats,
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
