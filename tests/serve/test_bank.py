"""The bank's CPU paths (masked whole bank, gathered rows, per-slot groups) give the same
y = W0 x + b + B_s A_s x for every token as a direct computation."""

import torch
from conftest import DEVICE
from torch import nn

from loraflow.serve.bank import AdapterBank, BankedLinear, RowCopies, TokenSlots, banked_siblings


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


def _flora_bank():
    torch.manual_seed(2)
    model = One()
    bank = AdapterBank(model, n_slots=5, r_max=4)
    factors = {}
    for slot, (r, flora) in enumerate([(1, True), (4, True), (2, False), (3, True)]):
        a, c = torch.randn(r, 24), torch.randn(40, r)
        bank.write(slot, {"proj": (a, c)}, multiplicative=flora)
        factors[slot] = (a, c, flora)
    bank.write(4, {}, multiplicative=True)  # a FLoRA adapter that leaves this layer alone
    return model, bank, factors


def _expected(layer, x, slots, factors):
    w0 = layer.weight.double()
    out = []
    for i, s in enumerate(slots):
        xi, y = x[i].double(), w0 @ x[i].double() + layer.bias.double()
        if s in factors:
            a, c, flora = (t.double() if torch.is_tensor(t) else t for t in factors[s])
            y = (w0 * (c @ a)) @ xi + layer.bias.double() if flora else y + c @ (a @ xi)
        out.append(y)
    return torch.stack(out)


def test_flora_rows_in_fixed_shapes_equal_the_direct_computation():
    """The FLoRA path (``RowCopies``: every FLoRA token's r scaled copies, one row of scale 1
    for every other token, padded with invalid rows as in a decode graph) beside additive and
    base rows: y = Σ_k c_k ∘ (W0 (a_k ∘ x)) + b for FLoRA tokens, W0 x + b + C A x for LoRA
    ones, W0 x + b for the rest and for a FLoRA slot that does not adapt the layer."""
    model, bank, factors = _flora_bank()
    slots = [0, 1, 2, -1, 3, 1, 4, 0]
    tok, row, start, count = bank.flora_rows(slots)
    assert count.tolist() == [1, 4, 1, 1, 3, 4, 1, 1] and start.tolist() == [0, 1, 5, 6, 7, 10, 14, 15]
    assert row[start[2]] == bank.ones_row and row[1:5].tolist() == [4, 5, 6, 7] and row[14] == 4 * 4
    pad = 24 - len(tok)  # rows owned by no token, valid 0 (a decode graph's padding)
    as_t = lambda v, fill: torch.tensor(list(v) + [fill] * pad)
    valid = as_t([1.0] * len(tok), 0.0)[:, None]
    copies = RowCopies(as_t(tok, 3), as_t(row, 5), valid, torch.tensor(start), torch.tensor(count))
    additive = torch.tensor([s if s >= 0 and not bank.slot_flora[s] else -1 for s in slots])
    ts = TokenSlots(additive, [2], [], rows=TokenSlots.bank_rows(additive, 4), valid=(additive >= 0).float()[:, None],
                    copies=copies)  # fmt: skip
    x = torch.randn(len(slots), 24)
    y = model.proj(x, ts)
    torch.testing.assert_close(y.double(), _expected(model.proj, x, slots, factors), rtol=1e-4, atol=1e-4)
    built = TokenSlots.build(slots, bank, "cpu")  # what an eager (prefill) step builds: the same rows, unpadded
    assert built.copies is not None and built.ids.tolist() == additive.tolist()
    torch.testing.assert_close(model.proj(x, built), y, rtol=1e-5, atol=1e-5)


def test_flora_rows_through_the_triton_kernels_equal_the_direct_computation():
    """The same batch on ``DEVICE``: on CUDA the layer's Triton prologue and epilogue around the
    GEMM (``multi/triton_flora.py``); the kernels alone under Triton's interpreter otherwise."""
    from loraflow.multi import triton_flora

    model, bank, factors = _flora_bank()
    model.to(DEVICE)
    for m in bank.layers.values():  # the bank's buffers to the device
        p = m.packed
        p.flora_a, p.flora_c = p.flora_a.to(DEVICE), p.flora_c.to(DEVICE)
        p.a, p.bt, p.ranks, p.offsets = p.flora_a[:-1], p.flora_c[:-1], p.ranks.to(DEVICE), p.offsets.to(DEVICE)
    bank.device = torch.device(DEVICE)
    slots = [3, 1, -1, 2, 0, 4, 1, 1, 2]
    x = torch.randn(len(slots), 24, device=DEVICE)
    ts = TokenSlots.build(slots, bank, DEVICE)
    c, p, layer = ts.copies, model.proj.packed, model.proj
    u = triton_flora.stack(x, c.tok, c.row, p.flora_a)
    torch.testing.assert_close(u, x[c.tok] * p.flora_a[c.row])
    z = torch.nn.functional.linear(u, layer.weight)
    y = triton_flora.combine(z, p.flora_c, c.row, c.start, c.count, layer.bias)
    flora = torch.tensor([s >= 0 and bank.slot_flora[s] for s in slots], device=DEVICE)
    full = layer(x, ts)
    want = _expected(layer.cpu(), x.cpu(), slots, factors)
    torch.testing.assert_close(full.double().cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[flora].double().cpu(), want[flora.cpu()], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[~flora].double().cpu(), _expected(layer, x.cpu(), [-1] * len(slots), {})[~flora.cpu()],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


class Siblings(nn.Module):
    """q/k/v-like layers that read the same input, with biases, of unequal widths."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (BankedLinear(24, d, bias=True) for d in (40, 16, 16))
        for m in (self.q, self.k, self.v):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def _sibling_bank(adapted):
    torch.manual_seed(1)
    model = Siblings().to(DEVICE)
    bank = AdapterBank(model, n_slots=3, r_max=8)
    for slot, r in enumerate([8, 3, 5]):
        factors = {n: (torch.randn(r, 24), torch.randn(m.d_out, r)) for n, m in bank.layers.items() if n in adapted}
        bank.write(slot, {n: (a.to(DEVICE), b.to(DEVICE)) for n, (a, b) in factors.items()})
    return model, bank


def test_fused_siblings_equal_each_layer_alone():
    """One GEMM over [W_q; W_k; W_v] (and the adapters' deltas written into its column blocks
    first) gives what each layer computes alone: base only, all siblings adapted, one not;
    through the CPU paths and the GPU's "siblings" decode kernel (Triton's interpreter here)."""
    from loraflow.serve.bank import fuse_siblings

    slots = [0, 2, -1, 1, 0]
    for adapted in ({"q", "k", "v"}, {"q", "v"}, set()):
        model, bank = _sibling_bank(adapted)
        layers = (model.q, model.k, model.v)
        x = torch.randn(len(slots), 24, device=DEVICE)
        variants = [TokenSlots.build(slots, bank, DEVICE)]
        if triton_ok():
            ids = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
            variants.append(TokenSlots(ids, sorted({s for s in slots if s >= 0}), [], variant="siblings"))
        for ts in variants:
            alone = [m(x, ts) for m in layers]
            weights = [m.weight.clone() for m in layers]
            fused = fuse_siblings(layers)
            assert all(torch.equal(m.weight, w) for m, w in zip(layers, weights))
            assert all(m.weight.data_ptr() == fused.weight[o:].data_ptr() for m, o in zip(layers, (0, 40, 56)))
            together = banked_siblings(x, ts, layers, fused)
            for j, (got, want) in enumerate(zip(together, alone)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=f"{sorted(adapted)} {ts.variant} {j}")


def triton_ok() -> bool:
    try:
        from loraflow.multi import triton_siblings  # noqa: F401
    except ImportError:
        return False
    return True
