"""The bank's CPU paths (masked whole bank, gathered rows, per-slot groups) give the same
y = W0 x + b + B_s A_s x for every token as a direct computation."""

import torch
from torch import nn

from loraflow.serve.bank import AdapterBank, BankedLinear, TokenSlots


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = BankedLinear(24, 40, bias=True)
        nn.init.normal_(self.proj.weight)
        nn.init.normal_(self.proj.bias)


def test_cpu_paths_equal_the_direct_computation():
    torch.manual_seed(0)
    model = One()
    bank = AdapterBank(model, n_slots=6, r_max=8)
    factors = {}
    for slot, r in enumerate([8, 3, 5, 8, 1, 2]):
        a, b = torch.randn(r, 24), torch.randn(40, r)
        bank.write(slot, {"proj": (a, b)})
        factors[slot] = (a, b)
    layer = model.proj
    cases = {
        "mask": [0, 1, 2, 3, 4, 5, -1, 2],  # 8 tokens, bank of 6 slots: read it whole
        "rows": [5, 1],  # 2 tokens: gather their rows
        "groups": [1] * 20 + [4] * 20 + [-1] * 3,
    }  # many tokens per slot: a matmul per slot
    for path, slots in cases.items():
        ts = TokenSlots.build(slots, bank, "cpu")
        assert {"mask": ts.mask, "rows": ts.rows, "groups": ts.groups or None}[path] is not None, path
        x = torch.randn(len(slots), 24)
        y = layer(x, ts)
        for i, s in enumerate(slots):
            expected = layer.weight @ x[i] + layer.bias
            if s >= 0:
                a, b = factors[s]
                expected = expected + b @ (a @ x[i])
            torch.testing.assert_close(y[i], expected, rtol=1e-4, atol=1e-4, msg=f"{path}, token {i}")
