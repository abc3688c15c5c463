"""Each op against the reference loop, every row checked, on fresh random inputs."""

import pytest
import torch
from conftest import rel_err

from loraflow.multi import ops


def problem(seed, rows=9, T=3, d_in=24, d_out=20, ranks=(1, 4, 8), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=g, dtype=dtype) for r in ranks]
    B = [torch.randn(d_out, r, generator=g, dtype=dtype) for r in ranks]
    scales = [0.5, 2.0, 1.25][: len(ranks)]
    x = torch.randn(rows, T, d_in, generator=g, dtype=dtype)
    slots = torch.randint(-1, len(ranks), (rows,), generator=g)
    slots[:2] = torch.tensor([-1, 0])  # at least one base row, one adapter row
    return x, slots, A, B, scales


def dense_reference(x, slots, A, B, scales):
    y = torch.zeros(*x.shape[:-1], B[0].shape[0], dtype=x.dtype)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            y[i] = scales[s] * x[i] @ (B[s] @ A[s]).T
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loop_equals_dense_per_row_computation(seed):
    x, slots, A, B, scales = problem(seed)
    torch.testing.assert_close(ops.loop(x, slots, A, B, scales), dense_reference(x, slots, A, B, scales))


@pytest.mark.parametrize("op", [ops.bmm, ops.segmented])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_equals_loop(op, seed):
    x, slots, A, B, scales = problem(seed)
    ref = ops.loop(x, slots, A, B, scales)
    out = op(x, slots, A, B, scales)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-12
    assert (out[slots < 0] == 0).all()


def test_ops_when_no_row_uses_an_adapter():
    x, slots, A, B, scales = problem(0)
    slots[:] = -1
    for op in (ops.loop, ops.bmm, ops.segmented):
        assert (op(x, slots, A, B, scales) == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_flora_paths_equal_the_merged_weight_per_row(seed):
    x, slots, A, B, _ = problem(seed, ranks=(1, 2, 5))
    A = [1 + 0.3 * a for a in A]
    slots = slots.clamp_min(0)  # FLoRA ops take FLoRA rows only
    w0 = torch.randn(20, 24, dtype=torch.float64)
    ref = torch.stack([x[i] @ (w0 * (B[s] @ A[s]) / A[s].shape[0]).T for i, s in enumerate(slots.tolist())])
    for fn in (ops.flora_loop, ops.flora_dense, ops.flora_bmm):
        assert rel_err(fn(x, slots, w0, A, B), ref) < 1e-12, fn.__name__
