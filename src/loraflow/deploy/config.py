"""What a deployment of many replicas is made of: the engine every replica builds, how many
replicas and what each takes from the cluster, and the router's limits. Plain values only:
it travels to every replica, and `serve run loraflow.deploy.app:build key=value ...` (or a
Serve config file's ``args``) fills it from text.

No Ray here: ``loraflow serve`` checks a configuration before it imports Ray."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from loraflow.serve.llama import SHAPES


@dataclass
class DeployConfig:
    # the engine each replica builds (the options of ``loraflow serve``)
    model: str | None = None  # a local Hugging Face folder; None: the embedded SmolLM2
    random_weights: str | None = None  # a shape of serve/llama.py's SHAPES with random weights
    lora: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    adapter_dir: str | None = None
    allow_runtime_lora: bool = False
    api_key: str | None = None
    max_gpu_adapters: int = 8
    max_cpu_adapters: int = 64
    max_lora_rank: int = 64
    max_batch_tokens: int | None = None  # None: each replica's device decides (2,048 on a GPU, 512 on the CPU)
    max_waiting: int = 1024
    kv_cache_bytes: int | None = None  # None: the engine's default (half the free GPU memory, 512 MiB on the CPU)
    request_timeout: float | None = 600.0
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 4 * 2**20
    body_timeout: float = 30.0
    log_requests: bool = True
    # the replicas
    replicas: int = 2
    replica_cpus: float = 1.0  # Ray's CPU resource per replica
    replica_gpus: float = 0.0  # Ray's GPU resource per replica: 1 for a GPU each, 0.5 for two on a GPU
    threads: int | None = None  # PyTorch threads of a replica on the CPU (None: replica_cpus, at least 1)
    adapters_per_replica: int | None = None  # adapters a replica holds for routing (None: max_cpu_adapters)
    max_ongoing_requests: int = 256  # a replica's requests at once before Serve queues or routes elsewhere
    health_check_period_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0  # a draining replica's time to finish its requests
    # the adapter catalog: runtime loads and unloads, each replica's metrics
    heartbeat_s: float = 0.5  # how often a replica reports to the catalog (and so how old /metrics may be)
    stale_s: float = 5.0  # a replica not heard from for this long counts as gone
    sync_timeout_s: float = 30.0  # how long a load or unload waits for every replica to apply it

    def __post_init__(self):
        if self.random_weights is not None and self.random_weights not in SHAPES:
            raise ValueError(f"random_weights must be one of {sorted(SHAPES)}, got {self.random_weights!r}")
        if self.model is not None and self.random_weights is not None:
            raise ValueError("give model (a folder) or random_weights (a shape), not both")
        if not isinstance(self.lora, dict) or not all(isinstance(v, str) for v in self.lora.values()):
            raise ValueError(f"lora must map adapter names to folders, got {self.lora!r}")
        if self.allow_runtime_lora and self.adapter_dir is None:
            raise ValueError("allow_runtime_lora needs adapter_dir (adapters load only from under it)")
        for name in ("replicas", "max_gpu_adapters", "max_cpu_adapters", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        for name in ("max_waiting", "max_ongoing_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError(
                f"replica_cpus and replica_gpus must be >= 0, got {self.replica_cpus} and {self.replica_gpus}"
            )
        if self.replica_gpus > 1 and not float(self.replica_gpus).is_integer():
            raise ValueError(f"replica_gpus above 1 must be whole GPUs, got {self.replica_gpus}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.adapters_per_replica is not None and self.adapters_per_replica < 1:
            raise ValueError(f"adapters_per_replica must be at least 1, got {self.adapters_per_replica}")
        for name in ("heartbeat_s", "stale_s", "sync_timeout_s", "health_check_period_s", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.stale_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_s ({self.stale_s}) must exceed two heartbeats ({2 * self.heartbeat_s} s): "
                "raise stale_s or lower heartbeat_s"
            )
        if self.graceful_shutdown_timeout_s < 0:
            raise ValueError(f"graceful_shutdown_timeout_s must be >= 0, got {self.graceful_shutdown_timeout_s}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds (or None: no limit), got {self.request_timeout}")

    @property
    def held_per_replica(self) -> int:
        """The size of each replica's LRU of adapters in Serve's multiplexing (what routing follows)."""
        return self.adapters_per_replica or self.max_cpu_adapters

    def replica_threads(self) -> int:
        return self.threads or max(1, int(self.replica_cpus))

    def engine_spec(self, device: str = "cpu"):
        """What each replica builds its engine from (``tp_launch.EngineSpec``) on ``device``
        ("cuda" or "cpu": the default max_batch_tokens is ``loraflow serve``'s for it)."""
        from loraflow.serve.tp_launch import EngineSpec

        return EngineSpec(
            self.model,
            self.random_weights,
            dict(
                adapters=dict(self.lora),
                adapter_dir=self.adapter_dir,
                max_batch_tokens=self.max_batch_tokens or (2048 if device == "cuda" else 512),
                max_gpu_adapters=self.max_gpu_adapters,
                max_cpu_adapters=self.max_cpu_adapters,
                max_lora_rank=self.max_lora_rank,
                max_waiting=self.max_waiting,
                request_timeout=self.request_timeout,
                kv_cache_bytes=self.kv_cache_bytes,
            ),
        )

    @classmethod
    def from_mapping(cls, args: dict) -> DeployConfig:
        """From `serve run`'s ``key=value`` arguments (text) or a config file's ``args`` (typed):
        numbers and booleans are read from text, ``lora`` from ``name=path,name=path``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}: the options are {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _parse(k, v, hints[k]) for k, v in args.items()})


def _parse(name: str, value, hint):
    if not isinstance(value, str):
        return value
    types = set(typing.get_args(hint)) or {hint}
    if value.lower() in ("none", "null") and type(None) in types:
        return None
    try:
        if bool in types:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if int in types:
            return int(value)
        if float in types:
            return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {hint}") from None
    if typing.get_origin(hint) is dict or hint is dict:
        pairs = [p.partition("=") for p in value.split(",") if p]
        if any(not sep or not k or not v for k, sep, v in pairs):
            raise ValueError(f"{name}={value!r}: give name=path pairs separated by commas")
        return {k: v for k, _, v in pairs}
    return value
