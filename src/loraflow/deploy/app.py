"""The Ray Serve application: a router in front of ``replicas`` engine replicas, and the
catalog beside them. ``loraflow serve --ray`` runs it; so does Serve's own command line:

    serve run loraflow.deploy.app:build random_weights=tiny replicas=2 adapter_dir=adapters

or a Serve config file (``serve deploy config.yaml`` on a running cluster)::

    applications:
      - name: loraflow
        route_prefix: /
        import_path: loraflow.deploy.app:build
        args: {model: /models/llama, adapter_dir: /shared/adapters, replicas: 4, replica_gpus: 1}

``args`` are ``DeployConfig``'s fields (``config.py``)."""

from __future__ import annotations

from ray import serve

from loraflow.deploy.catalog import Catalog, actor_gone
from loraflow.deploy.config import DeployConfig
from loraflow.deploy.replica import EngineReplica
from loraflow.deploy.router import Router

APP_NAME = "loraflow"
MANY = 100_000  # the router and the catalog take every request Serve hands them (they only pass them on)


def application(config: DeployConfig):
    """The bound application for ``serve.run``."""
    catalog = serve.deployment(
        Catalog,
        name="LoraflowCatalog",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=MANY,
        logging_config={"enable_access_log": False},  # a line per heartbeat says nothing
    ).bind(config.stale_s, 2 * config.heartbeat_s, actor_gone)
    replicas = serve.deployment(
        EngineReplica,
        name="LoraflowReplica",
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    ).bind(config, catalog)
    return serve.deployment(
        Router, name="LoraflowRouter", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MANY
    ).bind(config, replicas, catalog)


def build(args: dict):
    """Serve's application builder: ``DeployConfig``'s fields as ``key=value`` (or a config file's args)."""
    return application(DeployConfig.from_mapping(dict(args)))
