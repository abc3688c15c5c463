"""Padding-free attention: rows of different lengths packed end to end into one sequence, each
row attending only to itself (FlashAttention-2's variable-length form, Dao 2023, Sec. 3).

A batch of N rows of lengths L_1..L_N becomes one row of T = Σ L_i tokens; ``cu_seq_lens``
(N+1,) holds the offsets [0, L_1, L_1+L_2, ..., T]. For row i with tokens s..e-1,

    out[t] = softmax(q_t K[s:t+1]^T · scale) V[s:t+1]          for s <= t < e

so no token is spent on padding (the padded batch costs N · max L_i in every linear layer).
The position ids restart at 0 for each row, so RoPE sees each row as it would alone.

``use_varlen_attention(model)`` points a Hugging Face model's attention at ``varlen_attention``
(registered in transformers' ``AttentionInterface``); a forward that passes ``cu_seq_lens_q``
and ``max_length_q`` (transformers' own names for them) takes the packed path, any other
forward is transformers' SDPA, unchanged. On CUDA the packed path is PyTorch's
``varlen_attn`` (FlashAttention); elsewhere each row is one causal SDPA call.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

NAME = "loraflow_varlen"
FAMILIES = ("llama",)  # full causal attention, no sliding window: what the packed path computes


def supports_varlen(model: nn.Module) -> bool:
    """Whether ``model`` can take packed batches: a decoder family whose attention is full
    causal attention through transformers' ``AttentionInterface``."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in FAMILIES and getattr(model, "_supports_attention_backend", False)


def use_varlen_attention(model: nn.Module) -> None:
    """Route ``model``'s attention through ``varlen_attention`` (SDPA where nothing is packed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not supports_varlen(model):
        raise ValueError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) cannot take packed batches; "
            f"padding-free training supports {', '.join(FAMILIES)} models: train it with padded batches"
        )
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    model.set_attn_implementation(NAME)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, T, D), key and value (B, H_kv, T, D);
    returns (B, T, H, D). Packed (``cu_seq_lens_q`` given): B = 1, rows apart."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    assert query.shape[0] == 1 and dropout == 0.0, "a packed batch is one row, without attention dropout"
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D), (T, H_kv, D)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):  # FlashAttention's dtypes
        out = _flash_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    else:
        out = _rows_sdpa(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None  # (1, T, H, D)


def _flash_varlen(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """PyTorch's FlashAttention varlen kernel: causal, grouped-query heads. Its keywords changed
    between releases (2.10: ``is_causal``; later: ``window_size``, ``scale``, ``enable_gqa``)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _keywords(varlen_attn)
    if "enable_gqa" in params:
        gqa = {"enable_gqa": k.shape[1] != q.shape[1]}
    else:  # older kernels: every query head its own copy of its key/value head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        gqa = {}
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if scale is not None and "scale" not in params:  # the kernel's own scale is D^-1/2
        q = q * (scale * q.shape[-1] ** 0.5)
    elif scale is not None:
        causal["scale"] = scale
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **gqa)


@functools.cache
def _keywords(fn) -> frozenset[str]:
    """The keywords ``fn`` takes, looked up once (every layer of every step asks)."""
    return frozenset(inspect.signature(fn).parameters)


def _rows_sdpa(q, k, v, cu: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The same attention one row at a time (CPU; the reference the kernel is tested against)."""
    bounds = cu.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[s:e].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        out.append(oi.transpose(0, 1))  # (L, H, D)
    return torch.cat(out)


def _mask(*args, attention_mask=None, allow_is_causal_skip: bool = True, **kwargs):
    """The 4D mask for a forward: none for a packed batch (the rows are apart in the kernel;
    transformers marks packing by turning off the causal skip without a 2D mask), SDPA's
    otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not allow_is_causal_skip:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
