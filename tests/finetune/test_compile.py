"""`--compile` compiles the body the losses call, in one graph, and trains as eager does."""

import json

import pytest
from torch._dynamo.utils import counters

from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.loop import finetune


def test_compiled_body_is_one_graph_and_logs_the_eager_losses(tmp_path, tiny_smol, chat_file):
    kw = dict(model=tiny_smol, data=chat_file, steps=3, save_every=3, batch_size=4, max_length=64, lr=1e-2,
              dev_fraction=0.0, progress=False, padding_free=False)  # fmt: skip
    finetune(FinetuneConfig(out=str(tmp_path / "eager"), **kw))
    counters.clear()
    try:
        finetune(FinetuneConfig(out=str(tmp_path / "compiled"), compile=True, **kw))
    except Exception as e:  # no C++ compiler for Inductor's CPU kernels, say
        if "inductor" in type(e).__module__ or "Compiler" in str(e):
            pytest.skip(f"torch.compile cannot run here: {e}")
        raise
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / n / "log.jsonl")] for n in ("eager", "compiled")]
    assert logs[1] == pytest.approx(logs[0], rel=1e-4)
