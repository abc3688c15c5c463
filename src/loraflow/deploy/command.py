"""``loraflow serve --ray``: the application of ``app.py`` on a Ray cluster, until Ctrl-C or
SIGTERM. Without ``--ray-address`` it starts a Ray cluster on this machine (and stops it on
exit); with one it joins that cluster, and on exit removes its application and leaves the
cluster (and Serve on it) running."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from loraflow.deploy.config import DeployConfig

INSTALL = "install it with pip install 'loraflow[ray]'"


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.exit(f"loraflow serve: --ray needs Ray Serve, which is not installed here: {INSTALL}")
    return ray, serve


@dataclass
class Cluster:
    """Where the application runs: ``started`` when this process started the Ray cluster."""

    started: bool

    def resources(self) -> dict:
        import ray

        return ray.cluster_resources()


def connect(address: str | None = None, **init_kw) -> Cluster:
    """Join the Ray cluster at ``address``, or start one on this machine (no dashboard unless
    ``include_dashboard=True``). Ray's usage statistics stay off unless RAY_USAGE_STATS_ENABLED says otherwise."""
    ray, _ = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return Cluster(started=False)
    if address:
        ray.init(address=address, **init_kw)
        return Cluster(started=False)
    joins = "RAY_ADDRESS" in os.environ  # ray.init() joins that cluster
    ray.init(**({"include_dashboard": False} | init_kw))
    return Cluster(started=not joins)


def check_fits(config: DeployConfig, resources: dict) -> None:
    """A ValueError naming the fix when the replicas ask for more than a cluster of fixed size has."""
    asked = (("CPU", config.replica_cpus, "--ray-replica-cpus"), ("GPU", config.replica_gpus, "--ray-replica-gpus"))
    for what, each, flag in asked:
        need, have = config.replicas * each, resources.get(what, 0.0)
        if need > have + 1e-9:
            raise ValueError(
                f"{config.replicas} replicas x {each:g} {what} need {need:g} {what}s, but the Ray cluster has "
                f"{have:g}: lower --ray-replicas or {flag} (a fraction shares one), or join a larger cluster "
                "with --ray-address"
            )


def start(config: DeployConfig, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Serve's HTTP proxy on ``host:port`` (0: a free port) and the application; its URL once
    every replica is up."""
    _, serve = import_ray()
    from loraflow.deploy.app import APP_NAME, application

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(cluster: Cluster) -> None:
    ray, serve = import_ray()
    from loraflow.deploy.app import APP_NAME

    try:
        serve.delete(APP_NAME)
        if cluster.started:
            serve.shutdown()
    finally:
        if cluster.started:
            ray.shutdown()


def describe() -> dict:
    """The catalog's view: the base model's name and the live replicas' reports."""
    _, serve = import_ray()
    from loraflow.deploy.app import APP_NAME

    return serve.get_deployment_handle("LoraflowCatalog", app_name=APP_NAME).describe.remote().result()


def config_from_args(args, adapters: dict[str, str], api_key: str | None, resources: dict) -> DeployConfig:
    gpus = args.ray_replica_gpus
    if gpus is None:  # a GPU each where the cluster has GPUs
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    return DeployConfig(
        model=args.model,
        random_weights=args.random_weights,
        lora=adapters,
        adapter_dir=args.adapter_dir,
        allow_runtime_lora=args.allow_runtime_lora,
        api_key=api_key,
        max_gpu_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_lora_rank=args.max_lora_rank,
        max_batch_tokens=args.max_batch_tokens,
        max_waiting=args.max_waiting,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
        request_timeout=args.request_timeout or None,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        body_timeout=args.body_timeout,
        log_requests=args.log_requests,
        replicas=args.ray_replicas,
        replica_cpus=args.ray_replica_cpus,
        replica_gpus=gpus,
        threads=args.threads,
        adapters_per_replica=args.ray_adapters_per_replica,
        max_ongoing_requests=args.ray_max_ongoing_requests,
    )


def cmd_serve_ray(args, adapters: dict[str, str], api_key: str | None) -> None:
    """Serve the API from ``--ray-replicas`` replicas on Ray Serve until SIGINT or SIGTERM."""
    import_ray()
    cluster = connect(args.ray_address)
    try:
        try:
            config = config_from_args(args, adapters, api_key, cluster.resources())
            if cluster.started:  # a cluster of this machine does not grow: refuse what cannot start
                check_fits(config, cluster.resources())
        except ValueError as e:
            sys.exit(f"loraflow serve: {e}")
        url = start(config, args.host, args.port)
        info = describe()
        where = "a Ray cluster started on this machine" if cluster.started else f"the Ray cluster at {args.ray_address}"
        print(
            f"serving {info['base_model']} on {url}/v1 from {len(info['replicas'])} replicas on Ray Serve ({where})",
            flush=True,
        )
        stopping = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping.wait(1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        stop(cluster)
