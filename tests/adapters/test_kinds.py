"""The adapter-kind registry: a new kind is its own classes plus one ``register`` call, and
then goes through add, save, load and a mixed batch like the built-in kinds."""

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import DEVICE, ids, outputs, randomize, rel_err, tiny_llama
from torch import nn

import loraflow as lf
from loraflow.adapters.kinds import KINDS, AdapterKind, kind_named, kind_of, make, register, required


@dataclass
class VectorConfig:
    """A toy IA3-like kind on square layers: y = W0 x + v ∘ x (a scaled identity, v per feature)."""

    r: int = 1  # adapter files carry an "r"; this kind has none to speak of
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "o_proj"])
    kind: ClassVar[str] = "VECTOR"


class Vector(nn.Module):
    def __init__(self, d_in: int, d_out: int, device=None, dtype=None):
        super().__init__()
        assert d_in == d_out, "a scaled identity needs a square layer"
        self.v = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"vector.weight": self.v}

    def forward(self, x, base):
        return base(x) + x * self.v  # (..., d_out)


VECTOR = AdapterKind(
    "VECTOR",
    VectorConfig,
    Vector,
    r"vector\.weight",
    build=lambda c, name, d_in, d_out, shape, **kw: Vector(d_in, d_out, **kw),
    from_fields=lambda fields, targets: make(VectorConfig, fields, r=required(fields, "r"), target_modules=targets),
    to_fields=lambda c, _: {},
    shape_from_file=lambda found: {},
    required_keys=lambda found: ["vector.weight"],
    additive=lambda m: (
        torch.diag(m.v),
        torch.eye(m.v.numel(), dtype=m.v.dtype, device=m.v.device),
        1.0,
        nn.Identity(),
    ),
)


@pytest.fixture
def vector_kind():
    register(VECTOR)
    yield VECTOR
    KINDS.pop("VECTOR")


def test_built_in_kinds_are_registered_by_config_module_and_name():
    for config, module, name in [
        (lf.LoRAConfig(), lf.LoRA, "LORA"),
        (lf.FLoRAConfig(), lf.FLoRA, "FLORA"),
        (lf.DeepLoRAConfig(), lf.DeepLoRA, "DEEP_LORA"),
    ]:
        assert kind_of(config) is kind_named(name) and kind_named(name).module is module
    assert kind_named("FLORA").additive is None and kind_named("LORA").additive is not None
    with pytest.raises(ValueError, match="LORA, FLORA, DEEP_LORA"):
        kind_named("IA3")
    with pytest.raises(TypeError, match="no registered adapter kind"):
        kind_of(VectorConfig())


@torch.no_grad()
def test_a_registered_toy_kind_round_trips_through_add_save_load_and_a_mixed_batch(vector_kind, tmp_path):
    model, x = tiny_llama().to(DEVICE), ids(batch=3).to(DEVICE)  # triton runs on CUDA, or interpreted
    base = outputs(model, x)
    lf.add_adapter(model, VectorConfig(), name="vec")
    assert torch.allclose(outputs(model, x), base)  # zero-init: the base model
    for _, layer in lf.adapter_layers(model, "vec"):
        layer.adapters["vec"].v.copy_(torch.randn(layer.d_in, device=DEVICE) * 0.3)
    lf.add_adapter(model, lf.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), name="lora")
    randomize(model, "lora")
    one_by_one = []
    for row, name in enumerate(["vec", None, "lora"]):
        lf.set_adapter(model, name)
        one_by_one.append(outputs(model, x[row : row + 1]))
    assert not torch.allclose(one_by_one[0], base[:1], atol=1e-4)  # the kind changes the output
    for impl in ("loop", "segmented", "bmm", "triton"):
        with lf.use_adapters(model, ["vec", None, "lora"], impl=impl):
            mixed = outputs(model, x)
        assert rel_err(mixed, torch.cat(one_by_one)) < 1e-5, impl

    lf.save_adapter(model, tmp_path / "vec", name="vec")
    fields = json.loads((tmp_path / "vec" / "adapter_config.json").read_text())
    assert fields["peft_type"] == "VECTOR" and sorted(fields["target_modules"]) == ["o_proj", "q_proj"]
    fresh = tiny_llama().to(DEVICE)
    assert lf.load_adapter(fresh, tmp_path / "vec") == "vec"
    lf.set_adapter(fresh, "vec")
    assert torch.allclose(outputs(fresh, x[:1]), one_by_one[0], atol=1e-6)

    # the server's bank takes the kind's additive factors: scale·B A = diag(v) on each layer
    from loraflow.serve.registry import factors_for_bank

    shapes = {n: (m.out_features, m.in_features) for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)}
    factors = factors_for_bank(tmp_path / "vec", shapes, r_max=64)
    layers = dict(lf.adapter_layers(model, "vec"))
    assert set(factors) == set(layers)
    for name, (a, b) in factors.items():
        assert torch.allclose(b @ a, torch.diag(layers[name].adapters["vec"].v).cpu(), atol=1e-6)
