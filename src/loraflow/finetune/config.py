"""What a fine-tuning run is: one dataclass, checked before anything is loaded or written.

``loraflow finetune`` fills it from the command line; ``lf.finetune(FinetuneConfig(...))``
takes it directly. Every check raises a ValueError that says what to change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

Task = Literal["causal-lm", "classification"]
Method = Literal["lora", "flora", "deep-lora", "full", "galore"]
TASKS: tuple[str, ...] = ("causal-lm", "classification")
METHODS: tuple[str, ...] = ("lora", "flora", "deep-lora", "full", "galore")
ADAPTER_METHODS = ("lora", "flora", "deep-lora")
# peak learning rates that work for each method on small instruct models (AdamW)
DEFAULT_LR = {"lora": 2e-4, "flora": 2e-3, "deep-lora": 1e-3, "full": 2e-5, "galore": 1e-4}

# what --resume compares: a checkpoint of another run must not be continued with these changed
RUN_IDENTITY = (
    "task",
    "method",
    "model",
    "data",
    "tenants",
    "text_column",
    "label_columns",
    "r",
    "alpha",
    "targets",
    "use_rslora",
    "depth",
    "epsilon",
    "gamma",
    "galore_rank",
    "max_length",
    "batch_size",
    "group_by_length",
    "seed",
)  # and accumulation x processes (the rows of a step), which the checkpoint checks


@dataclass
class FinetuneConfig:
    out: str
    data: str | None = None  # training file (or folder of text files for causal-lm)
    task: Task = "causal-lm"
    model: str | None = None  # a local Hugging Face folder; None: the embedded default model
    tenants: dict[str, str] = field(default_factory=dict)  # NAME -> data: one adapter per tenant
    dev: str | None = None  # a dev file; else --dev-fraction of the training data is carved out
    dev_fraction: float = 0.1
    text_column: str = "text"
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    class_weights: bool = False
    method: Method = "lora"
    r: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "all-linear"
    dropout: float = 0.0
    use_rslora: bool = False
    depth: int = 3  # Deep LoRA
    epsilon: float = 1e-3
    gamma: float = 0.1
    galore_rank: int = 128  # GaLore
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    max_length: int = 512
    epochs: float | None = None  # default: 1 epoch unless steps is given
    steps: int | None = None
    batch_size: int = 8
    accumulation: int = 1
    group_by_length: bool = False  # batches of examples of about one length: less padding
    padding_free: bool | None = None  # rows packed end to end (varlen attention); default: on CUDA where it applies
    lr: float | None = None  # default: DEFAULT_LR[method]
    warmup: float = 0.03  # fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | None = None  # default: on CUDA
    seed: int = 0
    eval_every: int | None = None  # default: 10 evaluations over the run
    save_every: int | None = None  # default: every evaluation
    early_stopping: int | None = None  # evaluations without improvement before stopping
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # several processes under torchrun (distributed/)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if bool(self.data) == bool(self.tenants):
            raise ValueError(
                "give the training data either as data= (--data FILE) or as tenants= (--tenant NAME=FILE, "
                "repeated), not both and not neither"
            )
        for name in self.tenants:
            if not name or "." in name or "/" in name or name.startswith("-"):
                raise ValueError(f"tenant name {name!r}: use letters, digits, '-' or '_' (it names a folder)")
        if self.tenants and self.method not in ADAPTER_METHODS:
            raise ValueError(
                f"--tenant trains one adapter per tenant: use --method lora, flora or deep-lora, not {self.method}"
            )
        if self.tenants and self.task != "causal-lm":
            raise ValueError("--tenant supports --task causal-lm; train classifiers one run at a time")
        if self.tenants and self.dev:
            raise ValueError("with --tenant, each tenant's dev rows are carved out (--dev-fraction); drop --dev")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1) (0: no dev split), got {self.dev_fraction}")
        if self.task == "classification":
            if not self.label_columns or len(set(self.label_columns)) != len(self.label_columns):
                raise ValueError(f"label_columns must name distinct columns, got {self.label_columns}")
        for name in ("r", "max_length", "batch_size", "accumulation", "depth", "galore_rank", "update_proj_gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("alpha", "epsilon", "gamma", "galore_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give epochs or steps, not both")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm}")
        for name in ("eval_every", "save_every", "early_stopping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be none, ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp" and not self.adapter:
            raise ValueError(
                f"--parallel fsdp shards the frozen base under adapters (lora, flora, deep-lora); for --method "
                f"{self.method} use --parallel ddp, or loraflow pretrain --parallel fsdp"
            )
        if self.padding_free and self.tenants:
            raise ValueError("padding-free batches take one adapter: drop --padding-free for a --tenant job")
        if self.early_stopping and not (self.dev or self.dev_fraction > 0):
            raise ValueError("early_stopping needs a dev split: pass --dev FILE or --dev-fraction > 0")

    @property
    def adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    def identity(self) -> dict:
        """The fields that make a run this run (what --resume compares)."""
        fields = asdict(self)
        return {k: fields[k] for k in RUN_IDENTITY}
