"""Block-wise 8-bit storage for optimizer states (in loraflow itself: no bitsandbytes).

Each block of 256 values is divided by its absolute maximum A and rounded to the nearest
of 256 fixed levels spaced logarithmically over seven decades (a "dynamic exponent" code,
after Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022):

- signed (Adam's first moment): 0, ±10^(-7 + 7k/126) for k = 0..126;
- unsigned (second moment): 0, 10^(-7 + 7k/254) for k = 0..254.

Error bound, per value x of a block with absolute maximum A: if |x| >= 1e-7·A, the
relative error is at most (q - 1)/(q + 1) with q the ratio of adjacent levels: 6.4% signed,
3.2% unsigned; below that the absolute error is at most 1e-7·A. Storage: one byte per value
plus a float32 A per block.
"""

from __future__ import annotations

import math

import torch

BLOCK = 256
DECADES = 7
SIGNED_REL_ERROR = (10 ** (DECADES / 126) - 1) / (10 ** (DECADES / 126) + 1)
UNSIGNED_REL_ERROR = (10 ** (DECADES / 254) - 1) / (10 ** (DECADES / 254) + 1)
_CODES: dict = {}


def codebook(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, midpoints between them), sorted, float32, cached per device."""
    key = (signed, str(device))
    if key not in _CODES:
        if signed:
            pos = torch.logspace(-DECADES, 0, 127, dtype=torch.float64)
            levels = torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos])
        else:
            levels = torch.cat(
                [torch.zeros(1, dtype=torch.float64), torch.logspace(-DECADES, 0, 255, dtype=torch.float64)]
            )
        levels = levels.float().to(device)
        _CODES[key] = (levels, (levels[1:] + levels[:-1]) / 2)
    return _CODES[key]


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (numel,), block maxima float32 (ceil(numel / 256),))."""
    flat = x.detach().float().flatten()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % BLOCK)).view(-1, BLOCK)
    absmax = padded.abs().amax(1).clamp_min(1e-30)
    _, mids = codebook(signed, x.device)
    codes = torch.bucketize(padded / absmax[:, None], mids).to(torch.uint8)
    return codes.flatten()[:n].contiguous(), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool) -> torch.Tensor:
    levels, _ = codebook(signed, codes.device)
    n = codes.numel()
    padded = torch.nn.functional.pad(codes, (0, (-n) % BLOCK)).view(-1, BLOCK)
    return (levels[padded.long()] * absmax[:, None]).flatten()[:n].view(shape)


def quantized_bytes(numel: int) -> int:
    return numel + 4 * math.ceil(numel / BLOCK)
