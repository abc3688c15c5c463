"""The model a fine-tuning run trains: the base model with its adapters (one per tenant) or all
of its weights, a classification head where the task has labels, and the losses.

Classification follows DRG-LLaMA (Wang et al., 2024): a decoder's last non-pad token's
hidden state h goes through a linear head, ``logits = W_score h`` (no bias), trained with
the adapter. Several label columns share one head of ``Σ K_j`` outputs, split into one
softmax per column (the base-class + severity model), so the folder stays PEFT's layout:
``score`` in ``modules_to_save``, and ``peft.PeftModel.from_pretrained`` on a
``*ForSequenceClassification`` model with ``num_labels = Σ K_j`` loads it.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraflow import adapters as lf_adapters
from loraflow.atomic import atomic_update_dir, atomic_write_dir
from loraflow.finetune.config import FinetuneConfig
from loraflow.losses import linear_cross_entropy
from loraflow.models import load_model

LABELS_NAME = "labels.json"  # {"heads": [{"column": ..., "classes": [...]}, ...]}
HEAD = "score"  # transformers' name of a decoder's sequence-classification head


def adapter_config(cfg: FinetuneConfig):
    """The adapter config of ``cfg.method`` (None for full / GaLore training)."""
    if cfg.method == "lora":
        return lf_adapters.LoRAConfig(
            r=cfg.r, alpha=cfg.alpha, target_modules=cfg.targets, dropout=cfg.dropout, use_rslora=cfg.use_rslora
        )
    if cfg.method == "flora":
        return lf_adapters.FLoRAConfig(r=cfg.r, target_modules=cfg.targets)
    if cfg.method == "deep-lora":
        return lf_adapters.DeepLoRAConfig(
            r=cfg.r, depth=cfg.depth, epsilon=cfg.epsilon, gamma=cfg.gamma, target_modules=cfg.targets
        )
    return None


def build_model(cfg: FinetuneConfig, names: list[str], num_labels: int | None, device: str, bf16: bool):
    """(model, tokenizer) with adapters ``names`` added (or every weight trainable), the
    frozen base in bfloat16 when ``bf16`` and everything trained in float32."""
    task = "sequence-classification" if cfg.task == "classification" else "causal-lm"
    kw = {"num_labels": num_labels} if num_labels else {}
    frozen_dtype = torch.bfloat16 if bf16 and cfg.adapter else torch.float32
    with _quiet_transformers():  # its load report calls the new head "MISSING": it is, by design
        model, tok = load_model(cfg.model, task=task, dtype=frozen_dtype, device=device, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    if cfg.task == "classification" and not isinstance(getattr(model, HEAD, None), nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear '{HEAD}' head: loraflow's classifier fine-tunes decoder "
            "models (Llama, Mistral, Qwen, ...)"
        )
    if cfg.adapter:
        for name in names:  # each tenant's init from its own seed: the same alone or beside others
            torch.manual_seed(cfg.seed + zlib.crc32(name.encode()))
            lf_adapters.add_adapter(model, adapter_config(cfg), name=name)
    if cfg.task == "classification":
        getattr(model, HEAD).float()
    model.train()
    return model, tok


def trainable(model: nn.Module, cfg: FinetuneConfig, names: list[str]) -> dict[str, list[nn.Parameter]]:
    """Freeze all but what the run trains; returns the trained parameters by owner (a tenant's
    name, "head", or "model"), in float32."""
    for p in model.parameters():
        p.requires_grad_(False)
    owners: dict[str, list[nn.Parameter]] = {}
    if cfg.adapter:
        for name in names:
            owners[name] = lf_adapters.adapter_parameters(model, name)
    else:
        owners["model"] = [p for n, p in model.named_parameters() if not n.startswith(HEAD + ".")]
    if cfg.task == "classification":
        owners["head"] = list(getattr(model, HEAD).parameters())
    for params in owners.values():
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
    return owners


def classify(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """logits = W_score h_last: the head on each row's last non-pad token (right padding)."""
    # input_ids, attention_mask: (B, T)
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
    last = attention_mask.sum(1) - 1  # (B,)
    pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (B, d)
    head = getattr(model, HEAD)
    return F.linear(pooled.to(head.weight.dtype), head.weight, head.bias)  # (B, Σ K_j)


def head_losses(
    logits: torch.Tensor, classes: torch.Tensor, sizes: list[int], weights: list[torch.Tensor] | None
) -> torch.Tensor:
    """Σ over heads j of the summed cross-entropy of softmax(logits[:, head j]) against
    ``classes[:, j]`` (per-class ``weights`` when given): (rows,) losses, not yet averaged."""
    # logits: (B, Σ K_j), classes: (B, heads)
    total = logits.new_zeros(len(logits))
    for j, part in enumerate(logits.split(sizes, dim=-1)):  # part: (B, K_j)
        w = weights[j].to(part.device) if weights else None
        total = total + F.cross_entropy(part.float(), classes[:, j], weight=w, reduction="none")
    return total


def token_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy of each row over its labelled tokens: (B,). A plain
    linear head goes through ``linear_cross_entropy`` (never all the logits in float32)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    head = plain_head(model)
    if head is not None:
        body = getattr(model, model.base_model_prefix)
        hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
        return linear_cross_entropy(hidden[:, :-1], head.weight, targets).sum(1)  # (B,)
    logits = model(**inputs).logits  # (B, T, V)
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(b, t - 1).sum(1)  # (B,)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output layer when the logits are just ``hidden @ W.T`` (a bias-free Linear, no
    logit scaling or soft-capping in the config, no adapter on it); else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    scaled = any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if type(head) is nn.Linear and head.bias is None and not scaled and hasattr(model, "base_model_prefix"):
        return head
    return None


def save_adapter_to(model: nn.Module, name: str, folder: Path, heads: list[dict] | None) -> None:
    """Write adapter ``name`` (and the head and its labels.json, for a classifier) into
    ``folder`` in PEFT's layout, all its files as one unit (``atomic_update_dir``): a reader,
    or a kill at any instant, sees the previous adapter whole (an ``--overwrite``'d run's) or
    this one, never one's weights with the other's config. The folder's other files (run.json,
    log.jsonl, checkpoint/) stay as they are; a classifier's labels.json left by an earlier
    run goes when this adapter is no classifier."""
    from safetensors.torch import save_file

    from loraflow.adapters.files import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME, adapter_files

    tensors, fields = adapter_files(model, name, [HEAD] if heads else None)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")
        if heads:
            (tmp / LABELS_NAME).write_text(json.dumps({"heads": heads}, indent=2) + "\n")

    atomic_update_dir(folder, write, owned=ADAPTER_FILES | {LABELS_NAME})


def save_model_to(model: nn.Module, tok, folder: Path, heads: list[dict] | None) -> None:
    """Full or GaLore fine-tuning: the whole model as a Hugging Face folder, swapped in whole."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if heads:
            (tmp / LABELS_NAME).write_text(json.dumps({"heads": heads}, indent=2) + "\n")

    atomic_write_dir(folder, write)


def read_heads(folder: Path) -> list[dict]:
    file = Path(folder) / LABELS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {folder} is not a classifier saved by loraflow finetune")
    heads = json.loads(file.read_text())["heads"]
    return heads


def load_classifier(folder: str | Path, model: str | None = None, device: str = "cpu", dtype=torch.float32):
    """(model, tokenizer, heads) of a classifier that ``loraflow finetune --task
    classification`` wrote: an adapter folder (on ``model``, default the embedded one) or a
    whole model folder (full / GaLore fine-tuning)."""
    folder = Path(folder)
    heads = read_heads(folder)
    num_labels = sum(len(h["classes"]) for h in heads)
    if (folder / "adapter_config.json").is_file():
        with _quiet_transformers():
            clf, tok = load_model(
                model, task="sequence-classification", dtype=dtype, device=device, num_labels=num_labels
            )
        getattr(clf, HEAD).float()  # the head's trained float32 weights stay float32
        lf_adapters.load_adapter(clf, folder, name="classifier")
    else:
        clf, tok = load_model(folder, task="sequence-classification", dtype=dtype, device=device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return clf.eval(), tok, heads


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
