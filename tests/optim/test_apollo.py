"""APOLLO and APOLLO-Mini against a float64 reference written here from the paper's Algorithm 1;
the state sizes; resume; groups without rank are AdamW."""

import io
import math

import pytest
import torch
from torch import nn

import loraflow as lf
from loraflow.optim import apollo, state_bytes


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 3))


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 3, generator=g)


def train(model, opt, steps=6):
    x, y = data()
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def weight_groups(model, **kw):
    two_d = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": two_d, **kw}, {"params": rest}]


def reference_step(w, g, st, t, P, lr, wd, scale, tensor, b1=0.9, b2=0.999, eps=1e-6, gamma=1.01):
    """Algorithm 1 in float64 for one weight (m x n), std side: project the side GaLore projects."""
    left = w.shape[0] < w.shape[1]
    gs = g if left else g.T  # (k, c)
    R = P @ gs
    st["m"] = b1 * st.get("m", torch.zeros_like(R)) + (1 - b1) * R
    st["v"] = b2 * st.get("v", torch.zeros_like(R)) + (1 - b2) * R * R
    Rt = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)
    if tensor:
        s = Rt.norm() / R.norm()
    else:
        s = Rt.norm(dim=0) / R.norm(dim=0)
    G = scale * gs * s
    if "prev" in st and G.norm() > gamma * st["prev"]:
        G = G * (gamma * st["prev"] / G.norm())
    st["prev"] = G.norm()
    G = G if left else G.T
    return w * (1 - lr * wd) - lr * G


@pytest.mark.parametrize("mini", [False, True])
def test_apollo_equals_algorithm_1_in_float64(mini, monkeypatch):
    drawn = []  # (seed, rank, k) of each projection the optimizer used, in order
    real = apollo.projection

    def spy(seed, rank, k, device):
        drawn.append((seed, rank, k))
        return real(seed, rank, k, device)

    monkeypatch.setattr(apollo, "projection", spy)
    model = mlp()
    start = [p.detach().double().clone() for p in model.parameters()]
    cls = lf.ApolloMini if mini else lf.Apollo
    opt = cls(weight_groups(model, rank=3, update_proj_gap=3), lr=1e-2, weight_decay=0.1)
    steps = 7  # new projections at steps 1, 4 and 7
    grads = train(model, opt, steps=steps)
    weights = [p for p in model.parameters() if p.dim() == 2]
    assert len(drawn) == steps * len(weights) and all(r == (1 if mini else 3) for _, r, _ in drawn)
    scale = math.sqrt(128) if mini else 1.0
    for i, (p, w) in enumerate(zip(model.parameters(), start)):
        st = {}
        for t in range(1, steps + 1):
            g = grads[t - 1][i].double()
            if p.dim() == 2:
                seed, rank, k = drawn[(t - 1) * len(weights) + [id(q) for q in weights].index(id(p))]
                P = real(seed, rank, k, "cpu").double()
                w = reference_step(w, g, st, t, P, 1e-2, 0.1, scale, tensor=mini)
            else:  # AdamW
                st["m"] = 0.9 * st.get("m", torch.zeros_like(g)) + 0.1 * g
                st["v"] = 0.999 * st.get("v", torch.zeros_like(g)) + 0.001 * g * g
                d = (st["m"] / (1 - 0.9**t)) / ((st["v"] / (1 - 0.999**t)).sqrt() + 1e-6)
                w = w * (1 - 1e-2 * 0.1) - 1e-2 * d
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_projection_is_redrawn_every_gap_and_seeded():
    model = mlp()
    opt = lf.Apollo(weight_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    w = model[0].weight
    seeds = []
    x, y = data()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        seeds.append(int(opt.state[w]["proj_seed"]))
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] != seeds[4]
    a, b = apollo.projection(7, 3, 400, "cpu"), apollo.projection(7, 3, 400, "cpu")
    assert torch.equal(a, b) and abs(float(a.pow(2).mean()) - 1 / 3) < 0.05  # N(0, 1/r)


def test_mini_states_are_a_tenth_of_adamws_at_most():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))
    opt = lf.ApolloMini(weight_groups(model, rank=64), lr=1e-2)  # Mini: rank 1 whatever is asked
    train(model, opt, steps=2)
    for p in model.parameters():
        st = opt.state[p]
        if p.dim() == 2:
            channels = p.shape[1] if p.shape[0] < p.shape[1] else p.shape[0]
            assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (1, channels)
            assert st["prev_norm"].numel() == 1 and isinstance(st["proj_seed"], int)  # the seed: on the host
    two_d = [p for p in model.parameters() if p.dim() == 2]
    mini = sum(_bytes(opt.state[p]) for p in two_d)
    # two float32 rows of the channels and a float32 norm per weight (the seed is a Python int)
    assert mini == sum(4 * 2 * (p.shape[1] if p.shape[0] < p.shape[1] else p.shape[0]) + 4 for p in two_d)
    assert mini < 2 * 4 * sum(p.numel() for p in two_d) / 10  # AdamW: two float32 moments a weight


def _bytes(st: dict) -> int:
    return sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))


def test_state_dict_loads_with_weights_only_and_resume_is_bit_identical():
    def make():
        m = mlp()
        return m, lf.Apollo(weight_groups(m, rank=3, update_proj_gap=3), lr=1e-2, weight_decay=0.01)

    straight, opt = make()
    train(straight, opt, steps=8)
    first, opt1 = make()
    train(first, opt1, steps=4)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, steps=4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert state_bytes(opt2) == state_bytes(opt)


def test_8bit_apollo_trains_close_to_32bit():
    losses = {}
    for cls in (lf.Apollo, lf.ApolloAdamW8bit):
        model = mlp()
        opt = cls(weight_groups(model, rank=4), lr=1e-2)
        x, y = data()
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses[cls.__name__] = loss.item()
    first = nn.functional.mse_loss(mlp()(data()[0]), data()[1]).item()
    assert losses["Apollo"] < 0.8 * first and abs(losses["ApolloAdamW8bit"] - losses["Apollo"]) < 0.05 * first


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="scale_type must be"):
        lf.Apollo(weight_groups(mlp(), rank=2, scale_type="row"))
    with pytest.raises(ValueError, match="rank and update_proj_gap must be >= 1"):
        lf.Apollo(weight_groups(mlp(), rank=0))


def test_per_layer_optimizers_draw_each_weight_its_own_projection():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # two weights of one shape
    updates = lf.PerLayerUpdates(model, lambda g: lf.Apollo(g, lr=1e-2), weight_groups(model, rank=2))
    x = torch.randn(4, 8)
    model(x).square().mean().backward()
    updates.after_backward()
    seeds = {int(opt.state[p]["proj_seed"]) for opt in updates.optimizers.values() for p in opt.state if p.dim() == 2}
    assert len(seeds) == 2
