"""lf.finetune end to end on a tiny random Llama: every task and method, the output folder in
PEFT's layout, resume after a crash, many tenants in one job, and the refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraflow as lf
from loraflow.finetune import loop
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.loop import finetune
from loraflow.finetune.model import classify, load_classifier


def run(tmp_path, name="out", **kw):
    kw = {"out": str(tmp_path / name), "batch_size": 4, "max_length": 64, "progress": False, **kw}
    return finetune(FinetuneConfig(**kw))


def weights(folder) -> dict:
    return load_file(Path(folder) / "adapter_model.safetensors")


def test_chat_lora_learns_and_is_served(tmp_path, tiny_smol, chat_file):
    result = run(tmp_path, model=tiny_smol, data=chat_file, steps=30, lr=3e-2, eval_every=10)
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    # a random 64-wide model's logits are small (RMSNorm, 0.02-scale embeddings): the loss can
    # only move from ln(49152) = 10.8 by a little, but it must move
    assert len(log) == 30 and log[-1]["loss"] < log[0]["loss"] - 0.2
    dev = [r["dev"]["default"]["loss"] for r in log if "dev" in r]
    assert len(dev) == 3 and dev[-1] < dev[0]
    assert result["best"]["default"]["step"] in (10, 20, 30)
    out = tmp_path / "out"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    # the served form: the engine loads the folder and generates with it
    engine = lf.Engine(tiny_smol, adapters={"chat": str(out)}, device="cpu", decode_graphs=False)
    text = engine.generate(["What is 3 plus 3?"], adapters=["chat"], max_tokens=4, temperature=0.0)
    assert isinstance(text[0], str)
    # the kept adapter is the best dev one: its dev loss is the logged best
    model, tok = lf.load_model(tiny_smol)
    lf.load_adapter(model, out, name="chat")
    assert weights(out).keys() == {f"base_model.model.{k}" for k in _adapter_keys(model)}


def _adapter_keys(model):
    return [
        f"{m}.{suffix}"
        for m, layer in lf.adapter_layers(model, "chat")
        for suffix in layer.adapters["chat"].file_tensors()
    ]


def test_classifier_two_heads_loads_in_peft_with_equal_logits(tmp_path, tiny_smol, medical_csv):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    result = run(
        tmp_path, model=tiny_smol, data=medical_csv, task="classification", label_columns=["label", "severity"],
        steps=6, lr=1e-3, eval_every=3, dev_fraction=0.25,
    )  # fmt: skip
    out = tmp_path / "out"
    heads = json.loads((out / "labels.json").read_text())["heads"]
    assert [h["column"] for h in heads] == ["label", "severity"]
    assert heads[0]["classes"] == ["1", "2", "3", "4", "5"] and heads[1]["classes"] == ["high", "low"]
    assert {"joint_accuracy", "mean_macro_f1"} <= set(result["dev"]["default"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    ours, tok, _ = load_classifier(out, tiny_smol)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_smol, num_labels=7, dtype=torch.float32)
    base.config.pad_token_id = tok.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    batch = tok(["Chest pain and fever.", "The patient recovered well after surgery"], return_tensors="pt",
                padding=True)  # fmt: skip
    with torch.no_grad():
        mine = classify(ours, batch["input_ids"], batch["attention_mask"])
        peft_logits = theirs(**batch).logits
    assert torch.allclose(mine, peft_logits, atol=1e-5), (mine - peft_logits).abs().max()
    trained = load_file(out / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert trained.shape == (7, 64) and torch.equal(ours.score.weight.detach(), trained)


def test_full_fine_tuned_classifier_is_a_model_folder_that_eval_scores(tmp_path, tiny_smol, medical_csv):
    from loraflow.evaluate.command import main as eval_main

    run(tmp_path, model=tiny_smol, data=medical_csv, task="classification", method="full", steps=2, dev_fraction=0.0)
    folder = tmp_path / "out" / "model"
    assert (folder / "labels.json").is_file() and (folder / "config.json").is_file()
    metrics = eval_main(["--adapter", str(folder), "--data", medical_csv, "--out", str(tmp_path / "ev"),
                         "--max-length", "64", "--device", "cpu"])  # fmt: skip
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and set(metrics["top_k_accuracy"]) == {"1", "3"}


@pytest.mark.parametrize("method", ["flora", "deep-lora", "full", "galore"])
def test_every_method_trains_and_saves(tmp_path, tiny_smol, chat_file, method):
    run(tmp_path, model=tiny_smol, data=chat_file, method=method, steps=4, eval_every=2, r=2, galore_rank=4)
    out = tmp_path / "out"
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    if method in ("full", "galore"):
        model, _ = lf.load_model(out / "model")
        assert sum(p.numel() for p in model.parameters()) > 3_000_000
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == {"flora": "FLORA", "deep-lora": "DEEP_LORA"}[method]
        model, _ = lf.load_model(tiny_smol)
        lf.load_adapter(model, out, name="a")
        if method == "deep-lora":  # compressed from the first batch: width r
            w = weights(out)
            assert all(t.shape[0] == 2 or t.shape[1] == 2 for k, t in w.items())


@pytest.mark.parametrize("method", ["deep-lora", "flora", "lora"])
def test_classifier_in_bfloat16_mixed_precision(tmp_path, tiny_smol, medical_csv, method):
    """bf16 frozen weights under autocast, float32 adapter and head (what CUDA runs by default);
    Deep LoRA's compression step runs in the same precision (it failed on the H200 before)."""
    result = run(tmp_path, model=tiny_smol, data=medical_csv, task="classification", method=method, steps=2,
                 dev_fraction=0.25, bf16=True, r=2)  # fmt: skip
    assert 0.0 <= result["dev"]["default"]["macro_f1"] <= 1.0
    head = load_file(tmp_path / "out" / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert head.dtype == torch.float32


def test_resume_after_a_crash_ends_in_the_same_adapter(tmp_path, tiny_smol, chat_file, monkeypatch):
    kw = dict(model=tiny_smol, data=chat_file, steps=6, save_every=2, dev_fraction=0.0, lr=2e-3, dropout=0.0)
    run(tmp_path, "whole", **kw)
    real = loop._checkpoint

    def crash_after_step_4(out, step, *args):
        real(out, step, *args)
        if step == 4:
            raise KeyboardInterrupt  # as a kill right after the checkpoint (work after it is lost)

    monkeypatch.setattr(loop, "_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **kw)
    monkeypatch.setattr(loop, "_checkpoint", real)
    with pytest.raises(ValueError, match="--resume"):
        run(tmp_path, "crashed", **kw)  # without --resume: refused, nothing touched
    run(tmp_path, "crashed", resume=True, **kw)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "crashed" / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("method,grouped", [("lora", False), ("flora", False), ("lora", True)])
def test_each_tenant_equals_training_it_alone(tmp_path, tiny_smol, tenant_files, method, grouped):
    # saved once, at the end (no dev split: the default saves, and plots, after every step)
    kw = dict(model=tiny_smol, method=method, steps=5, save_every=5, dev_fraction=0.0, lr=3e-3, batch_size=3,
              accumulation=2, group_by_length=grouped)  # fmt: skip
    run(tmp_path, "together", tenants=tenant_files, **kw)
    for name, data in tenant_files.items():
        run(tmp_path, f"alone-{name}", tenants={name: data}, **kw)
        together, alone = weights(tmp_path / "together" / name), weights(tmp_path / f"alone-{name}" / name)
        assert together.keys() == alone.keys()
        for k in alone:
            torch.testing.assert_close(together[k], alone[k], rtol=1e-4, atol=1e-5)
    a, b = (weights(tmp_path / "together" / n) for n in tenant_files)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the tenants' adapters differ


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_inputs_are_refused_and_nothing_saved_is_touched(tmp_path, tiny_smol, chat_file, medical_csv):
    kw = dict(model=tiny_smol, steps=1, dev_fraction=0.0)
    run(tmp_path, data=chat_file, **kw)
    saved = _tree(tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a fine-tuned adapter.*--overwrite"):
        run(tmp_path, data=chat_file, **kw)
    with pytest.raises(ValueError, match=r"another run \(method: 'lora' then, 'flora' now"):
        run(tmp_path, data=chat_file, resume=True, method="flora", **kw)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        run(tmp_path, "fresh", data=chat_file, resume=True, **kw)
    assert _tree(tmp_path / "out") == saved

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no assistant turn"):
        run(tmp_path, "b1", data=str(bad), **kw)
    with pytest.raises(ValueError, match="columns found: text, label, severity"):
        run(tmp_path, "b2", data=medical_csv, task="classification", text_column="txt", **kw)
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"row {i},a\n" for i in range(6)) + "lonely row,b\n")
    with pytest.raises(ValueError, match="'b' has 1 example"):
        run(tmp_path, "b3", data=str(one), task="classification", model=tiny_smol, steps=1, dev_fraction=0.3)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        run(tmp_path, "b4", data=str(empty), task="classification", **kw)
    for name in ("b1", "b2", "b3", "b4"):  # refused before anything was written
        assert not (tmp_path / name / "adapter_config.json").exists()


def test_overwriting_a_classifier_with_a_causal_lm_adapter_drops_its_labels(tmp_path, tiny_smol, medical_csv,
                                                                           chat_file):  # fmt: skip
    run(tmp_path, model=tiny_smol, data=medical_csv, task="classification", steps=1, dev_fraction=0.0)
    assert (tmp_path / "out" / "labels.json").is_file()
    run(tmp_path, model=tiny_smol, data=chat_file, steps=1, dev_fraction=0.0, overwrite=True)
    assert not (tmp_path / "out" / "labels.json").exists()  # eval would take it for a classifier
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_long_texts_are_truncated_and_counted(tmp_path, tiny_smol, medical_csv, capsys):
    result = run(tmp_path, model=tiny_smol, data=medical_csv, task="classification", steps=1, dev_fraction=0.0,
                 max_length=32, progress=True)  # fmt: skip
    assert result["truncated"]["default"] == 40  # every abstract is longer than 32 tokens
    assert "40 of 40 examples are longer than --max-length 32 tokens" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["data"]["default"]["truncated"] == 40


def test_overwrite_replaces_and_cli_prints_a_summary(tmp_path, tiny_smol, chat_file, capsys):
    from loraflow.cli import main

    args = ["finetune", "--model", tiny_smol, "--data", chat_file, "--steps", "2", "--dev-fraction", "0",
            "--out", str(tmp_path / "o"), "--no-progress", "--max-length", "64", "--device", "cpu"]  # fmt: skip
    main(args)
    first = weights(tmp_path / "o")
    with pytest.raises(SystemExit, match="loraflow finetune: .*already holds"):
        main(args)
    main(args + ["--overwrite", "--seed", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["outputs"]["default"] == str(tmp_path / "o")
    assert any(not torch.equal(first[k], v) for k, v in weights(tmp_path / "o").items())
