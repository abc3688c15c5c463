"""The Triton kernels against the reference loop (CPU: TRITON_INTERPRET=1; GPU: bf16 too)."""

import pytest
import torch
from conftest import rel_err

from loraflow.multi import ops

triton_lora = pytest.importorskip("loraflow.multi.triton_lora")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(seed, N, ranks, d_in=40, d_out=72, dtype=torch.float32, base_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=g) for r in ranks]
    B = [torch.randn(d_out, r, generator=g) for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    x = torch.randn(N, d_in, generator=g)
    slots = torch.randint(0, len(ranks), (N,), generator=g)
    slots[torch.rand(N, generator=g) < base_fraction] = -1
    to = lambda t: t.to(DEVICE, dtype)
    return to(x), slots.to(DEVICE), [to(a) for a in A], [to(b) for b in B], scales


@pytest.mark.parametrize(
    "variant, N, ranks",
    [
        ("rows", 5, [16]),  # decode, one adapter
        ("rows", 9, [1, 4, 8, 3]),  # decode, mixed ranks without padding
        ("fused", 9, [1, 4, 8, 3]),  # decode in one launch
        ("fused", 3, [16]),
        ("tiles", 70, [2, 16]),  # prefill, segments longer than a tile
        ("tiles", 45, [1, 5, 32, 7]),  # prefill, mixed ranks, ragged segments
        (None, 130, [4, 4]),  # automatic choice
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_equal_the_loop(variant, N, ranks, seed):
    x, slots, A, B, scales = problem(seed, N, ranks)
    bias = torch.randn(B[0].shape[0], device=DEVICE)
    ref = ops.loop(x[:, None].double(), slots, [a.double() for a in A], [b.double() for b in B], scales)[:, 0].float()
    out = torch.full((N, B[0].shape[0]), float("nan"), device=DEVICE)  # poisoned: all must be written
    triton_lora.lora_delta(x, slots, triton_lora.PackedLoRA.pack(A, B, scales), variant=variant, out=out)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5
    assert (out[slots < 0] == 0).all()  # base rows: no delta
    with_bias = triton_lora.lora_delta(x, slots, triton_lora.PackedLoRA.pack(A, B, scales), variant=variant, bias=bias)
    assert rel_err(with_bias, ref + bias) < 1e-5


@pytest.mark.parametrize("config", [{"split_k": 1}, {"split_k": 3, "block_k": 16}, {"block_n": 32, "warps": 8}])
def test_launch_configs_do_not_change_results(config):
    for variant, N in [("rows", 6), ("fused", 6), ("tiles", 80)]:
        x, slots, A, B, scales = problem(5, N, [3, 16])
        ref = triton_lora.lora_delta(x, slots, triton_lora.PackedLoRA.pack(A, B, scales), variant=variant)
        got = triton_lora.lora_delta(
            x, slots, triton_lora.PackedLoRA.pack(A, B, scales), variant=variant, config=config
        )
        assert rel_err(got, ref) < 1e-6


def test_tile_plan_covers_every_adapter_token_once():
    slots = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2, 2])
    plan = triton_lora.tile_plan(slots, n=3, block_m=2)
    order, tslot, tstart, tend = plan.order, plan.tslot, plan.tstart, plan.tend
    covered = [int(order[i]) for s, e in zip(tstart.tolist(), tend.tolist()) for i in range(s, e)]
    assert sorted(covered) == list(range(len(slots)))  # base tokens too (they get zeros)
    for t, s, e in zip(tslot.tolist(), tstart.tolist(), tend.tolist()):
        assert all(int(slots[order[i]]) == t for i in range(s, e)) and e - s <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels run on CUDA")
@pytest.mark.parametrize("variant", ["rows", "fused", "tiles"])
def test_kernels_in_bf16_on_cuda(variant):
    x, slots, A, B, scales = problem(3, 256, [8, 16, 64, 1], d_in=512, d_out=384, dtype=torch.bfloat16)
    ref = ops.loop(x[:, None].double(), slots, [a.double() for a in A], [b.double() for b in B], scales)[:, 0]
    y = triton_lora.lora_delta(x, slots, triton_lora.PackedLoRA.pack(A, B, scales), variant=variant)
    assert rel_err(y.double(), ref) < 1e-2
