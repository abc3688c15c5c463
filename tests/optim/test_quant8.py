import io

import pytest
import torch
from torch import nn

import loraflow as lf
from loraflow.optim import analytic_state_bytes, quant8, state_bytes
from test_galore import data, mlp, train, weight_groups


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e4])
def test_quantization_error_is_within_the_documented_bound(signed, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 0, 5000).flip(0)[torch.randperm(5000, generator=g)]
    x = (x if signed else x.abs()) * scale
    codes, absmax = quant8.quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == 5000 and absmax.numel() == 20
    back = quant8.dequantize(codes, absmax, x.shape, signed)
    a = absmax.repeat_interleave(256)[:5000]
    big = x.abs() >= 1e-7 * a
    rel = ((back - x).abs() / x.abs())[big]
    bound = quant8.SIGNED_REL_ERROR if signed else quant8.UNSIGNED_REL_ERROR
    assert rel.max() <= bound + 1e-6
    assert ((back - x).abs()[~big] <= 1e-7 * a[~big] * (1 + 1e-6)).all()
    assert bound < (0.07 if signed else 0.035)


def test_8bit_galore_tracks_32bit_and_stores_a_quarter():
    a, b = mlp(), mlp()
    o32 = lf.GaLoreAdamW(weight_groups(a, rank=4, update_proj_gap=5, scale=1.0), lr=1e-2)
    o8 = lf.GaLoreAdamW8bit(weight_groups(b, rank=4, update_proj_gap=5, scale=1.0), lr=1e-2)
    x, y = data()
    start = nn.functional.mse_loss(b(x), y).item()
    train(a, o32, steps=25)
    train(b, o8, steps=25)
    l32, l8 = nn.functional.mse_loss(a(x), y).item(), nn.functional.mse_loss(b(x), y).item()
    assert l8 < 0.8 * start and abs(l8 - l32) < 0.1 * start
    assert state_bytes(o8) == analytic_state_bytes(o8, bits=8)
    moments_32 = sum(v.numel() * 4 for s in o32.state.values() for k, v in s.items() if k.startswith("exp_avg"))
    moments_8 = sum(v.numel() * v.element_size() for s in o8.state.values() for k, v in s.items()
                    if k.startswith("exp_avg"))
    assert moments_8 < 0.3 * moments_32
    buf = io.BytesIO()
    torch.save(o8.state_dict(), buf)
    buf.seek(0)
    o8.load_state_dict(torch.load(buf, weights_only=True))
