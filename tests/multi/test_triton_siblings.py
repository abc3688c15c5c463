"""Sibling layers' LoRA in shared launches equals each layer's own kernels and the loop."""

import pytest
import torch
from conftest import rel_err

from loraflow.multi import ops

triton_lora = pytest.importorskip("loraflow.multi.triton_lora")
from loraflow.multi.triton_siblings import lora_delta_siblings  # noqa: E402  (Triton needed)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sibling(seed, ranks, d_in, d_out):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, d_in, generator=g).to(DEVICE) for r in ranks]
    B = [torch.randn(d_out, r, generator=g).to(DEVICE) for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    return A, B, scales


@pytest.mark.parametrize(
    "d_outs, ranks",
    [
        ([72, 24, 24], [[4, 8, 1], [2, 8, 3], [8, 1, 5]]),  # q/k/v with grouped heads, mixed ranks per layer
        ([96, 96], [[8, 8, 8], [3, 0, 8]]),  # gate/up; slot 1 does not adapt up
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_shared_launches_equal_each_layers_kernels_and_the_loop(d_outs, ranks, bias):
    d_in, N = 40, 11
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, d_in, generator=g).to(DEVICE)
    slots = torch.tensor([0, 1, 2, -1, 2, 1, 0, -1, 1, 2, 0], device=DEVICE)
    layers = [sibling(j, [max(r, 1) for r in rs], d_in, d) for j, (rs, d) in enumerate(zip(ranks, d_outs))]
    packed = []
    for (A, B, scales), rs in zip(layers, ranks):
        p = triton_lora.PackedLoRA.pack(A, B, scales)
        p.ranks[:] = torch.tensor(rs, dtype=torch.int32)  # rank 0: the slot does not adapt this layer
        packed.append(p)
    biases = [torch.randn(d, generator=g).to(DEVICE) for d in d_outs] if bias else None
    got = lora_delta_siblings(x, slots, packed, biases)
    for j, ((A, B, scales), rs) in enumerate(zip(layers, ranks)):
        alone = triton_lora.lora_delta(x, slots, packed[j], "rows", bias=biases[j] if bias else None)
        assert rel_err(got[j], alone) < 1e-6
        used = [s if r else 0.0 for s, r in zip(scales, rs)]  # rank 0 adds nothing
        ref = ops.loop(x[:, None].double(), slots, [a.double() for a in A], [b.double() for b in B], used)[:, 0]
        assert rel_err(got[j], ref.float() + (biases[j] if bias else 0)) < 1e-5
        assert got[j].shape == (N, d_outs[j])


def test_one_or_four_siblings_and_mixed_biases_are_refused():
    x = torch.randn(2, 8, device=DEVICE)
    p = triton_lora.PackedLoRA.pack([torch.randn(2, 8, device=DEVICE)], [torch.randn(4, 2, device=DEVICE)], [1.0])
    with pytest.raises(ValueError, match="2 or 3 sibling layers"):
        lora_delta_siblings(x, torch.zeros(2, dtype=torch.long, device=DEVICE), [p])
    with pytest.raises(ValueError, match="all have a bias or all have none"):
        lora_delta_siblings(
            x, torch.zeros(2, dtype=torch.long, device=DEVICE), [p, p], [None, torch.zeros(4, device=DEVICE)]
        )
