import io

import pytest
import torch
from conftest import ids, tiny_llama
from torch import nn

from loraflow.optim import GaLoreAdamW, GaLoreSGD, analytic_state_bytes, galore_param_groups, projector, state_bytes


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3))


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 3, generator=g)


def train(model, opt, steps=6, seed=1):
    x, y = data(seed)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def weight_groups(model, **galore):
    two_d = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": two_d, **galore}, {"params": rest}]


@pytest.mark.parametrize("momentum, gap", [(0.0, 2), (0.9, 100)])
def test_full_rank_galore_sgd_equals_sgd(momentum, gap):
    """The paper's exactness property. (Momentum kept in a basis that then changes is not
    the full step any more, so with momentum the basis is held fixed.)"""
    a, b = mlp(), mlp()
    train(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=momentum))
    train(b, GaLoreSGD(weight_groups(b, rank=100, update_proj_gap=gap, scale=1.0), lr=0.1, momentum=momentum))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_low_rank_galore_trains_and_states_match_the_analytic_count(proj_type):
    model = mlp()
    x, y = data()
    before = nn.functional.mse_loss(model(x), y).item()
    opt = GaLoreAdamW(weight_groups(model, rank=2, update_proj_gap=3, scale=1.0, proj_type=proj_type), lr=2e-2)
    train(model, opt, steps=30)
    assert nn.functional.mse_loss(model(x), y).item() < 0.8 * before
    assert state_bytes(opt) == analytic_state_bytes(opt)
    w = model[0].weight
    r_side = projector.side(tuple(w.shape), proj_type)
    assert opt.state[w]["exp_avg"].shape == ((20, 2) if r_side == "right" else (2, 12))


@pytest.mark.parametrize("bits", [32, 8])
def test_bf16_weights_keep_bf16_bases_and_the_count_follows(bits):
    """Bases of 16-bit weights are stored in 16 bits (projections run in float32)."""
    from loraflow.optim import GaLoreAdamW8bit

    model = mlp().to(torch.bfloat16)
    x, y = data()
    cls = GaLoreAdamW if bits == 32 else GaLoreAdamW8bit
    opt = cls(weight_groups(model, rank=2, update_proj_gap=3, scale=1.0), lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        opt.step()
    w = model[0].weight
    assert opt.state[w]["proj"].dtype == torch.bfloat16 and opt.state[w]["proj"].shape == (12, 2)
    assert state_bytes(opt) == analytic_state_bytes(opt, bits=bits)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bits", [32, 8])
def test_loading_a_state_keeps_its_dtypes_for_bf16_weights(bits):
    """torch's load_state_dict casts floating states to the weights' dtype; ours must not
    (float32 moments and scales, uint8 codes), and a resumed run continues exactly."""
    from loraflow.optim import GaLoreAdamW8bit

    cls = GaLoreAdamW if bits == 32 else GaLoreAdamW8bit
    x, y = data()

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
            opt.step()

    a = mlp().to(torch.bfloat16)
    opt_a = cls(weight_groups(a, rank=2, update_proj_gap=3, scale=1.0), lr=1e-2)
    run(a, opt_a, 4)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = mlp().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    opt_b = cls(weight_groups(b, rank=2, update_proj_gap=3, scale=1.0), lr=1e-2)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key, value in opt_a.state[pa].items():
            if torch.is_tensor(value):
                assert opt_b.state[pb][key].dtype == value.dtype and torch.equal(opt_b.state[pb][key], value), key
    run(a, opt_a, 3)
    run(b, opt_b, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bf16_moments_halve_the_states_and_still_train():
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = mlp()
        x, y = data()
        before = nn.functional.mse_loss(model(x), y).item()
        opt = GaLoreAdamW(weight_groups(model, rank=2, update_proj_gap=3, scale=1.0), lr=2e-2, state_dtype=dtype)
        train(model, opt, steps=30)
        assert opt.state[model[0].weight]["exp_avg"].dtype == dtype
        assert state_bytes(opt) == analytic_state_bytes(opt)
        runs[dtype] = (nn.functional.mse_loss(model(x), y).item(), state_bytes(opt), opt)
    assert (
        runs[torch.bfloat16][0] < 0.8 * before and abs(runs[torch.bfloat16][0] - runs[torch.float32][0]) < 0.05 * before
    )
    bases = sum(s["proj"].numel() * 4 for s in runs[torch.float32][2].state.values() if "proj" in s)
    assert runs[torch.bfloat16][1] - bases == (runs[torch.float32][1] - bases) // 2
    with pytest.raises(ValueError, match="state_dtype"):
        GaLoreAdamW(mlp().parameters(), state_dtype=torch.float16)


def test_galore_state_is_smaller_than_adamw_state():
    model = tiny_llama()
    groups = galore_param_groups(model, rank=4, update_proj_gap=5)
    opt = GaLoreAdamW(groups, lr=1e-3)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = ids(batch=2, seq=8)
    for o in (opt, plain):
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        o.step()
    assert state_bytes(opt) == analytic_state_bytes(opt)
    adamw = sum(
        v.numel() * v.element_size()
        for s in plain.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    assert state_bytes(opt) < 0.75 * adamw
    assert not any(
        n.startswith("lm_head") or "embed" in n
        for n, p in model.named_parameters()
        if any(p is q for q in groups[0]["params"])
    )


def test_state_dict_loads_with_weights_only_and_resume_is_bit_identical():
    def make():
        m = mlp()
        return m, GaLoreAdamW(weight_groups(m, rank=3, update_proj_gap=4, scale=0.5), lr=1e-2, weight_decay=0.01)

    straight, opt = make()
    train(straight, opt, steps=10)

    first, opt1 = make()
    train(first, opt1, steps=5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, steps=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_svd_failures_fall_back_without_nans(monkeypatch):
    g = torch.randn(6, 4)
    calls = {"n": 0}
    real = torch.linalg.svd

    def flaky(x, full_matrices=True):
        calls["n"] += 1
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    basis = projector.top_singular(g, 2, "right")  # float64 retry on the CPU
    assert basis.dtype == torch.float32 and torch.isfinite(basis).all()

    def broken(x, full_matrices=True):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous projection"):
        assert torch.equal(projector.top_singular(g, 2, "right", previous=basis), basis)
    with pytest.raises(RuntimeError, match="no previous projection"):
        projector.top_singular(g, 2, "right")


def test_param_groups_check_their_arguments():
    with pytest.raises(ValueError, match="rank"):
        galore_param_groups(tiny_llama(), rank=0)
    with pytest.raises(ValueError, match="proj_type"):
        projector.side((4, 3), "diagonal")


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_galore_adafactor_trains_with_factored_states(beta1):
    from loraflow.optim import GaLoreAdafactor

    model = mlp()
    x, y = data()
    before = nn.functional.mse_loss(model(x), y).item()
    opt = GaLoreAdafactor(weight_groups(model, rank=4, update_proj_gap=5, scale=1.0), lr=1e-2, beta1=beta1)
    train(model, opt, steps=40)
    assert nn.functional.mse_loss(model(x), y).item() < 0.8 * before
    w = model[0].weight  # 20 x 12, right projection: R is 20 x 4
    assert opt.state[w]["exp_avg_sq_row"].shape == (20,) and opt.state[w]["exp_avg_sq_col"].shape == (4,)


def test_randomized_svd_finds_the_same_subspace():
    g = torch.randn(40, 3) @ torch.randn(3, 30) + 1e-3 * torch.randn(40, 30)  # rank 3 plus noise
    exact = projector.top_singular(g, 3, "right")
    fast = projector.top_singular(g, 3, "right", "randomized")
    assert torch.allclose(exact @ exact.T, fast @ fast.T, atol=1e-3)  # same projector
    groups = galore_param_groups(tiny_llama(), rank=4, svd="randomized")
    assert groups[0]["svd"] == "randomized"
    with pytest.raises(ValueError, match="svd must be one of"):
        galore_param_groups(tiny_llama(), rank=4, svd="qr")


@pytest.mark.parametrize("which", ["left", "right"])
def test_gram_basis_is_the_svd_basis(which):
    """A full-rank gradient with a decaying spectrum (no exact low-rank structure): the Gram
    matrix's top eigenvectors span the SVD's top singular subspace, largest first."""
    g = torch.randn(48, 48) @ torch.diag(torch.logspace(0, -3, 48)) @ torch.randn(48, 70)
    g = g if which == "right" else g.T
    exact = projector.top_singular(g, 8, which)
    gram = projector.top_singular(g, 8, which, "gram")
    assert gram.shape == exact.shape and gram.dtype == torch.float32
    assert torch.allclose(exact @ exact.T, gram @ gram.T, atol=1e-4)  # the same projector
    assert torch.allclose((exact * gram).sum(0).abs(), torch.ones(8), atol=1e-4)  # the same order, up to sign
    blocks = projector.gram_basis(g, 8, which, block=16)  # the product summed in 3-5 blocks
    assert torch.allclose(blocks @ blocks.T, gram @ gram.T, atol=1e-5)


def test_state_bytes_counts_tensors_that_objects_in_the_state_hold():
    """galore-torch keeps each basis in a projector object, not as a state tensor."""

    class Projector:
        def __init__(self):
            self.ortho_matrix, self.rank = torch.zeros(8, 4, dtype=torch.bfloat16), 4

    p = nn.Parameter(torch.zeros(8, 8))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"step": 3, "exp_avg": torch.zeros(8, 2), "projector": Projector()}
    assert state_bytes(opt) == 8 * 2 * 4 + 8 * 4 * 2


def test_gram_basis_signs_do_not_flip_under_rounding_level_changes():
    """GaLore keeps Adam's moments across a refresh, so a basis vector whose sign flips when
    the gradient changes in its last bits (two processes summing in another order) would
    turn its moments around: each vector's largest entry is positive."""
    torch.manual_seed(0)
    for _ in range(8):
        g = torch.randn(32, 48) @ torch.diag(torch.logspace(0, -2, 48)) @ torch.randn(48, 48)
        basis = projector.gram_basis(g, 4, "left")
        assert (basis.gather(0, basis.abs().argmax(0, keepdim=True)) > 0).all()
        for _ in range(4):
            nudged = projector.gram_basis(g + 1e-7 * g.abs().max() * torch.randn_like(g), 4, "left")
            assert torch.allclose(basis, nudged, atol=1e-4)


def test_older_optimizer_states_with_the_randomized_flag_still_load_their_method(monkeypatch):
    from loraflow.optim import galore

    model = nn.Sequential(nn.Linear(12, 20, bias=False))
    groups = weight_groups(model, rank=4, update_proj_gap=5, scale=1.0, randomized_svd=True)  # before "svd"
    opt = GaLoreAdamW(groups, lr=1e-2)
    seen, real = [], galore.top_singular
    monkeypatch.setattr(
        galore,
        "top_singular",
        lambda g, rank, which, method, previous, group=None: seen.append(method) or real(g, rank, which, method),
    )
    model(torch.randn(3, 12)).sum().backward()
    opt.step()
    assert seen == ["randomized"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_groups_without_rank_are_torch_adamw_step_for_step(dtype):
    """A group without ``rank`` is AdamW: the same weights as torch.optim.AdamW after each of
    several steps (same lr, betas, eps, decoupled weight decay), for 1-, 2- and 3-D weights.
    GaLoreAdamW computes the step in float32 whatever the weights' dtype (its moments are
    float32), so float64 weights match torch's float64 AdamW only to float32 precision."""
    shapes = [(7,), (5, 3), (2, 3, 4)]
    init = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=init, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [nn.Parameter(w.clone()) for w in start]
    theirs = [nn.Parameter(w.clone()) for w in start]
    settings = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.1}
    o = GaLoreAdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], **settings)
    t = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:], "weight_decay": 0.0}], **settings)
    gen = torch.Generator().manual_seed(1)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-6, "atol": 2e-6}
    for step in range(8):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype) * 10 ** (step % 3 - 1)
            a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
        for a, b, w0 in zip(ours, theirs, start):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **tol)
            assert (a - w0).abs().max() > 1e-2  # they did move
    for a, b in zip(ours, theirs):  # and the moments are AdamW's
        torch.testing.assert_close(o.state[a]["exp_avg"], t.state[b]["exp_avg"].float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(o.state[a]["exp_avg_sq"], t.state[b]["exp_avg_sq"].float(), rtol=1e-5, atol=1e-9)


def _galore_reference(w0, grads, rank, gap, scale, lr, betas, eps, wd, basis_sign):
    """GaLore's Algorithm 1 (Zhao et al. 2024) in float64 for one m x n weight, with the
    conventions of galore.py: the projected side is the smaller one (m < n: P = top-r left
    singular vectors, R = Pᵀ G, update P N; else Q = top-r right ones, R = G Q, update N Qᵀ);
    the basis is recomputed from the step's own gradient at steps 0, T, 2T, ... (0-based) and
    Adam's moments carry over a refresh unchanged; m̂, v̂ with bias correction by the step
    count since the start (1-based); N = m̂ / (√v̂ + eps); W <- W (1 - lr wd) - lr scale (P N).
    ``basis_sign(t, basis)``: the sign of each singular vector, which the SVD leaves free."""
    b1, b2 = betas
    w = w0.double().clone()
    m_, n_ = w.shape
    left = m_ < n_
    mom = var = basis = None
    trace = []
    for t, g in enumerate(grads):
        g = g.double()
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = basis_sign(t, u[:, :rank] if left else vh.T[:, :rank])
        r = basis.T @ g if left else g @ basis
        if mom is None:
            mom, var = torch.zeros_like(r), torch.zeros_like(r)
        mom = b1 * mom + (1 - b1) * r
        var = b2 * var + (1 - b2) * r * r
        n = (mom / (1 - b1 ** (t + 1))) / ((var / (1 - b2 ** (t + 1))).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * scale * (basis @ n if left else n @ basis.T)
        trace.append((w.clone(), mom.clone(), var.clone(), basis.clone()))
    return trace


@pytest.mark.parametrize("svd", ["full", "gram"])
@pytest.mark.parametrize("shape", [(9, 14), (16, 6)])  # left, right projection
def test_rank_group_equals_galore_algorithm_1_in_float64(shape, svd):
    """GaLoreAdamW on a rank-r group against a float64 reference of Algorithm 1, for 8 steps
    with T = 3 (refreshes at steps 0, 3, 6). The optimizer projects in float32 (basis,
    projection and moments are float32 even for float64 weights), so the comparison is at
    float32 precision. "full" is the SVD, whose vectors' signs are arbitrary: the reference
    takes each vector's sign from the optimizer's basis (and checks it is that vector up to
    sign); "gram" fixes the sign (largest entry positive), which the reference applies itself."""
    rank, gap, scale, lr, betas, eps, wd = 3, 3, 0.7, 2e-2, (0.9, 0.99), 1e-6, 0.05
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [
        torch.randn(shape, generator=gen, dtype=torch.float64)
        @ torch.diag(torch.logspace(0, -1, shape[1], dtype=torch.float64))
        for _ in range(8)
    ]  # singular values well apart
    w = nn.Parameter(w0.clone())
    opt = GaLoreAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": gap, "scale": scale, "svd": svd}],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
    )
    ours = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        s = opt.state[w]
        ours.append((w.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["proj"].clone()))

    def basis_sign(t, basis):
        if svd == "gram":  # projector.gram_basis's rule
            biggest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
            return basis * torch.where(biggest < 0, -1.0, 1.0).double()
        dots = (basis * ours[t][3].double()).sum(0)  # the optimizer's basis of that step
        torch.testing.assert_close(dots.abs(), torch.ones(rank, dtype=torch.float64), rtol=0, atol=1e-5)
        return basis * dots.sign()

    ref = _galore_reference(w0, grads, rank, gap, scale, lr, betas, eps, wd, basis_sign)
    left = shape[0] < shape[1]
    assert ours[0][1].shape == ((rank, shape[1]) if left else (shape[0], rank))
    assert ours[0][3].shape == ((shape[0], rank) if left else (shape[1], rank)) and ours[0][3].dtype == torch.float32
    for t, ((w_t, m_t, v_t, p_t), (w_r, m_r, v_r, p_r)) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p_t.double(), p_r, rtol=0, atol=1e-5, msg=f"basis, step {t}")
        torch.testing.assert_close(m_t.double(), m_r, rtol=1e-5, atol=1e-6, msg=f"first moment, step {t}")
        torch.testing.assert_close(v_t.double(), v_r, rtol=1e-5, atol=1e-8, msg=f"second moment, step {t}")
        # the weight's displacement, relative to its size: float32 projections of an O(1) weight
        torch.testing.assert_close(w_t - w0, w_r - w0, rtol=1e-5, atol=1e-6, msg=f"weight, step {t}")
    assert not torch.allclose(ours[2][3], ours[3][3], atol=1e-2)  # the refresh at step 3 changed the basis
    assert torch.equal(ours[3][3], ours[5][3])  # and held it until the next one
    assert (ref[-1][0] - w0).abs().max() > 2 * lr * scale  # the weight moved, by more than a step
