import io

import pytest
import torch
from conftest import rel_err, tiny_llama
from torch import nn

import loraflow as lf


def batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 9), generator=g) for _ in range(n)]


def ordinary(model, opt, data, accumulation, max_grad_norm=None):
    for i, x in enumerate(data):
        (model(input_ids=x, labels=x).loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad()


def per_layer(model, make, data, accumulation, **kw):
    updates = lf.PerLayerUpdates(model, make, accumulation=accumulation, **kw)
    for x in data:
        (model(input_ids=x, labels=x).loss / accumulation).backward()
        updates.after_backward()
    return updates


@pytest.mark.parametrize("galore", [False, True])
def test_per_layer_with_accumulation_equals_the_ordinary_run(galore):
    data = batches(8)
    a, b = tiny_llama(), tiny_llama()
    if galore:
        make = lambda groups: lf.GaLoreAdamW(groups, lr=1e-3, weight_decay=0.01)
        ordinary(a, make(lf.galore_param_groups(a, rank=4, update_proj_gap=1)), data, 4)
        per_layer(b, make, data, 4, param_groups=lf.galore_param_groups(b, rank=4, update_proj_gap=1))
    else:
        make = lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
        ordinary(a, make(a.parameters()), data, 4)
        per_layer(b, make, data, 4)
    changed = 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert rel_err(pb.detach(), pa.detach()) < 1e-5, n
        changed += int(not torch.equal(pa, tiny_llama().get_parameter(n)))
    assert changed > 10
    assert all(p.grad is None for p in b.parameters())  # gradients freed in the backward


def test_lagged_clipping_and_schedule():
    data = batches(6)
    model = tiny_llama()
    seen = []
    updates = per_layer(
        model,
        lambda g: torch.optim.SGD(g, lr=0.1),
        data,
        2,
        max_grad_norm=0.01,
        schedule=lambda step: seen.append(step) or 1.0 / (1 + step),
    )
    assert updates.steps == 3 and updates.last_grad_norm > 0.01
    assert sorted(set(seen)) == [0, 1, 2]
    assert all(g["lr"] == pytest.approx(0.1 / 3) for o in updates.optimizers.values() for g in o.param_groups)


def test_state_saves_loads_with_weights_only_and_resumes_bit_identically():
    data = batches(8)
    make = lambda groups: lf.GaLoreAdamW(groups, lr=1e-3)
    straight = tiny_llama()
    per_layer(straight, make, data, 2, param_groups=lf.galore_param_groups(straight, rank=4, update_proj_gap=2))

    first = tiny_llama()
    u1 = per_layer(first, make, data[:4], 2, param_groups=lf.galore_param_groups(first, rank=4, update_proj_gap=2))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "updates": u1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = tiny_llama()
    resumed.load_state_dict(saved["model"])
    u2 = lf.PerLayerUpdates(
        resumed, make, param_groups=lf.galore_param_groups(resumed, rank=4, update_proj_gap=2), accumulation=2
    )
    u2.load_state_dict(saved["updates"])
    for x in data[4:]:
        (resumed(input_ids=x, labels=x).loss / 2).backward()
        u2.after_backward()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="accumulation"):
        lf.PerLayerUpdates(tiny_llama(), lambda g: torch.optim.SGD(g, lr=0.1), accumulation=0)


def test_a_dropped_model_and_its_updates_are_freed():
    """The hooks sit in the parameters' C++ autograd data, out of the garbage collector's
    sight: were they to hold the optimizers, the model and its states would never be freed."""
    import gc
    import weakref

    model = tiny_llama()
    updates = lf.PerLayerUpdates(model, lambda g: lf.GaLoreAdamW(g, lr=1e-3))
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    updates.after_backward()
    state = next(iter(updates.optimizers.values())).state
    assert state  # stepped inside the backward pass
    alive = [weakref.ref(model), weakref.ref(updates), weakref.ref(next(iter(state.values()))["exp_avg"])]
    del model, updates, state
    gc.collect()
    assert [r() for r in alive] == [None, None, None]
