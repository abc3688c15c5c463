"""Per-layer weight updates: each parameter is stepped inside the backward pass, as soon as
its gradient is complete (post-accumulate-grad hooks), and its gradient freed at once, so
the gradients of the whole model are never held together (GaLore paper, Sec. 4.2).

With gradient accumulation the optimizers step only in the backward pass of the last
micro-batch of each step, on the summed gradients: the result equals an ordinary run.

    updates = lf.PerLayerUpdates(model, lambda groups: lf.GaLoreAdamW(groups, lr=1e-3),
                                 param_groups=lf.galore_param_groups(model, rank=128),
                                 accumulation=4, max_grad_norm=1.0, schedule=lambda step: 1.0)
    for batch in batches:
        (model(**batch).loss / 4).backward()
        updates.after_backward()

Gradient-norm clipping is lagged: the global norm is only known once every parameter has
stepped, so the gradients of step t are scaled by min(1, max_norm / ‖g_{t-1}‖), with the
global norm measured during step t-1 (``last_grad_norm``); the first step is not clipped.
``schedule(step)`` multiplies each optimizer's initial learning rate once per optimizer step.

Several processes: under FSDP2 the hooks are on the shards and fire after the
reduce-scatter (each process steps its shards; the norm is summed over them). Under DDP a
communication hook steps the weights of each gradient bucket once its all-reduce is done,
so each weight still steps as soon as its averaged gradient exists; DDP keeps the whole
gradient in its buckets, so there it saves no memory, only the wait for the last bucket.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from loraflow.optim import sharded


class PerLayerUpdates:
    def __init__(
        self,
        model: nn.Module,
        make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
        param_groups: list[dict] | None = None,
        accumulation: int = 1,
        max_grad_norm: float | None = None,
        schedule: Callable[[int], float] | None = None,
    ):
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        model = ddp.module if ddp is not None else model
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        names = {id(p): n for n, p in model.named_parameters()}
        self.accumulation, self.max_grad_norm, self.schedule = accumulation, max_grad_norm, schedule
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._handles = []
        index = 0
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                name, index = names[id(p)], index + 1
                # "param_index": the weight's place among all of them (APOLLO seeds its projections by it)
                opt = make_optimizer([{**settings, "params": [p], "param_index": index}])
                for g in opt.param_groups:
                    g.setdefault("initial_lr", g["lr"])
                self.optimizers[name] = opt
                if ddp is None:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))
        self._names = names
        self._group = next((sharded.part(p).group for p in model.parameters() if sharded.part(p).group), None)
        if ddp is not None:
            self._ddp_params = [p for g in groups for p in g["params"]]
            ddp.register_comm_hook(weakref.ref(self), _step_buckets)
        # The hooks live in the parameters' C++ autograd data, where Python's garbage collector
        # cannot see them: a hook holding this object (or an optimizer, which holds the
        # parameter) would keep the model and every state alive forever. They hold a weak
        # reference instead, and are removed when this object goes.
        weakref.finalize(self, _remove, self._handles)
        self.micro = 0  # backward passes done
        self.steps = 0  # optimizer steps done
        self.last_grad_norm: float | None = None
        self._sq = 0.0

    def _boundary(self) -> bool:
        return (self.micro + 1) % self.accumulation == 0

    def _hook(self, name: str):
        owner = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            updates = owner()
            if updates is not None and updates._boundary():
                updates._step(name, p)
            # else: keep accumulating into p.grad

        return hook

    def _step(self, name: str, p: torch.Tensor) -> None:
        """Step the weight ``name`` on its (complete, averaged) gradient, then free it."""
        opt = self.optimizers[name]
        if self.max_grad_norm is not None:
            self._sq += float(sharded.part(p).grad.detach().float().pow(2).sum())  # a shard's, summed later
            if self.last_grad_norm is not None and self.last_grad_norm > self.max_grad_norm:
                p.grad.mul_(self.max_grad_norm / (self.last_grad_norm + 1e-6))
        if self.schedule is not None:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * self.schedule(self.steps)
        opt.step()
        p.grad = None  # freed right away

    def after_backward(self) -> bool:
        """Call after every ``loss.backward()``; True when that backward ended a step."""
        boundary = self._boundary()
        self.micro += 1
        if boundary:
            self.steps += 1
            if self.max_grad_norm is not None:
                self._sq = float(sharded.all_sum(torch.tensor([self._sq], dtype=torch.float64), self._group))
                self.last_grad_norm = math.sqrt(self._sq)
                self._sq = 0.0
            for p in getattr(self, "_ddp_params", ()):  # DDP writes its buckets back into .grad
                p.grad = None
        return boundary

    def state_dict(self) -> dict:
        return {
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "micro": self.micro,
            "steps": self.steps,
            "last_grad_norm": self.last_grad_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.optimizers) - set(state["optimizers"])
        if missing:
            raise ValueError(
                f"the saved per-layer state has no optimizer for {sorted(missing)[:3]}: was it saved for another model?"
            )
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        self.micro, self.steps, self.last_grad_norm = state["micro"], state["steps"], state["last_grad_norm"]

    def remove(self) -> None:
        """Detach the hooks (the model trains normally again)."""
        _remove(self._handles)


def _step_buckets(owner, bucket):  # no annotations: DDP checks them as objects, and here they are strings
    """DDP's communication hook: average the bucket (dist.GradBucket) over the processes,
    then (at an accumulation boundary) step each of its weights on its averaged gradient."""
    world = dist.get_world_size()
    done = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()

    def step(fut):
        averaged = fut.value()[0]
        updates = owner()
        if updates is not None and updates._boundary():
            for p, grad in zip(bucket.parameters(), bucket.gradients()):  # views of ``averaged``
                p.grad = grad
                updates._step(updates._names[id(p)], p)
        return averaged

    return done.then(step)


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
