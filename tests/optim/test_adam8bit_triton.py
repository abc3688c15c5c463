"""The fused 8-bit Adam kernel equals the PyTorch path: same codes, same scales, same
direction (Triton's interpreter on the CPU, the GPU when there is one)."""

import io

import pytest
import torch
from conftest import DEVICE
from torch import nn

import loraflow as lf

pytest.importorskip("triton", reason="the fused 8-bit Adam kernel is written in Triton (not installed)")
from test_quant8 import SHAPES, run_8bit_against_float

from loraflow.optim.adam8bit_triton import adam8bit_direction


@pytest.mark.parametrize("n", [7, 256, 1000])
def test_fused_step_equals_the_pytorch_step(n):
    ref_opt = lf.GaLoreAdamW8bit([nn.Parameter(torch.zeros(n, device=DEVICE))], fused=False)
    group = ref_opt.param_groups[0]
    fused, ref = {}, {}
    g = torch.Generator().manual_seed(n)
    for t in range(1, 5):
        grad = (torch.randn(n, generator=g) * 10 ** torch.randint(-4, 1, (n,), generator=g)).to(DEVICE)
        ref["step"] = t
        # both start each step from the same stored state, so that a code that float rounding
        # put on the other side of a midpoint at one step does not carry into the next
        fused = {k: v.clone() for k, v in ref.items() if k != "step"}
        expected = ref_opt._direction(ref, grad, group)
        got = adam8bit_direction(fused, grad, *group["betas"], group["eps"], t)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            assert fused[f"{key}_codes"].dtype == torch.uint8 and fused[f"{key}_codes"].shape == (n,)
            assert (fused[f"{key}_codes"] != ref[f"{key}_codes"]).float().mean() <= 0.002  # float ties at midpoints
            torch.testing.assert_close(fused[f"{key}_absmax"], ref[f"{key}_absmax"], rtol=1e-6, atol=0)


def test_fused_8bit_adam_is_float_adam_within_the_documented_bound():
    """The kernel's moments are the float moments, each within one quantization's documented
    bound (6.4% / 3.2%, README), and its weights take float Adam's step from them; against
    the float GaLoreAdamW the moments stay within the accumulated bound (test_quant8)."""
    run_8bit_against_float(fused=True, device=DEVICE)


def _codes_agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same codes but where a value sat on a midpoint between two levels and float rounding
    picked the neighbour (<= 0.2% of them, one level apart)."""
    differ = a != b
    assert differ.float().mean() <= 0.002
    assert ((a[differ].int() - b[differ].int()).abs() == 1).all()


def test_fused_optimizer_equals_the_pytorch_8bit_path_and_states_interchange():
    """GaLoreAdamW8bit promises the same stored states either way (fused or not): the same
    gradients give the same codes, scales and weights; a state saved by the fused path
    continues on the PyTorch path as it would have on the fused one."""
    grads, fused, p_fused = run_8bit_against_float(fused=True, device=DEVICE)
    _, plain, p_plain = run_8bit_against_float(fused=False, device=DEVICE)
    codes_seen = 0
    for k in SHAPES:
        a, b = fused.state[p_fused[k]], plain.state[p_plain[k]]
        assert a["step"] == b["step"] == len(grads) and set(a) == set(b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert a[f"{key}_codes"].dtype == torch.uint8
            _codes_agree(a[f"{key}_codes"], b[f"{key}_codes"])
            codes_seen += a[f"{key}_codes"].numel()
            torch.testing.assert_close(a[f"{key}_absmax"], b[f"{key}_absmax"], rtol=1e-5, atol=0)
        diff = (p_fused[k] - p_plain[k]).abs()
        assert (diff > 1e-5).float().mean() <= 0.002 and diff.max() < 0.1  # ties only
    assert codes_seen > 2000

    # save the fused state, continue one step on the PyTorch path and one on the fused path
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    twin = {k: nn.Parameter(p.detach().clone()) for k, p in p_fused.items()}
    groups = [
        dict(g, params=[twin[k] for k in names]) for g, names in zip(fused.param_groups, (("w", "w2"), ("b", "m")))
    ]
    assert all(
        p is p_fused[k]
        for g, names in zip(fused.param_groups, (("w", "w2"), ("b", "m")))
        for p, k in zip(g["params"], names)
    )
    other = lf.GaLoreAdamW8bit(
        groups, lr=fused.defaults["lr"], weight_decay=fused.defaults["weight_decay"], fused=False
    )
    other.load_state_dict(torch.load(buf, weights_only=True))
    step = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE) for k, p in twin.items()}
    for ps, opt in ((p_fused, fused), (twin, other)):
        for k, p in ps.items():
            p.grad = step[k].clone()
        opt.step()
    for k in SHAPES:
        a, b = fused.state[p_fused[k]], other.state[twin[k]]
        assert b["step"] == a["step"] == len(grads) + 1
        assert ("proj" in a) == (k in ("w", "w2")) and ("proj" not in a or torch.equal(a["proj"], b["proj"]))
        for key in ("exp_avg", "exp_avg_sq"):
            _codes_agree(a[f"{key}_codes"], b[f"{key}_codes"])
        diff = (p_fused[k] - twin[k]).abs()
        assert (diff > 1e-5).float().mean() <= 0.002 and diff.max() < 0.1
