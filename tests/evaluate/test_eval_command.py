"""loraflow eval end to end on adapters that loraflow finetune wrote (tiny random model): the
metrics file's contract, the numbers against scikit-learn on its own predictions, perplexity,
code pass@k for several adapters in one run, and the refusals."""

import csv
import json
import math
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

from loraflow.cli import main
from loraflow.evaluate.command import main as eval_main
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.loop import finetune

MBPP = Path(__file__).resolve().parents[2] / "examples" / "data" / "mbpp" / "mbpp.jsonl"


def train(tmp_path, name, **kw):
    out = tmp_path / name
    finetune(FinetuneConfig(out=str(out), batch_size=4, max_length=64, progress=False, **kw))
    return out


def test_classification_metrics_contract_and_values(tmp_path, tiny_smol, medical_csv, capsys):
    adapter = train(tmp_path, "cls", model=tiny_smol, data=medical_csv, task="classification", steps=3,
                    dev_fraction=0.0)  # fmt: skip
    main(["eval", "--adapter", str(adapter), "--model", tiny_smol, "--data", medical_csv,
          "--out", str(tmp_path / "ev"), "--max-length", "64", "--device", "cpu"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"accuracy", "top_k_accuracy", "macro_f1", "micro_f1", "macro_auc"} <= set(metrics)
    assert set(metrics["top_k_accuracy"]) == {"1", "3"}  # 5 classes: k = 5 would be trivially 1
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "predictions.jsonl")]
    assert len(rows) == 40 and set(rows[0]) == {"label", "predicted", "probabilities"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
    y, p = [r["label"] for r in rows], [r["predicted"] for r in rows]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=sorted(set(y)), zero_division=0))
    assert printed["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_label_at_eval_is_named(tmp_path, tiny_smol, medical_csv):
    adapter = train(tmp_path, "cls", model=tiny_smol, data=medical_csv, task="classification", steps=1,
                    dev_fraction=0.0)  # fmt: skip
    dev = tmp_path / "dev.csv"
    with open(dev, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["fever and cough", "1"], ["a broken arm", "9"]])
    with pytest.raises(ValueError, match="'9'"):
        eval_main(["--adapter", str(adapter), "--model", tiny_smol, "--data", str(dev), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_perplexity_of_base_and_adapter(tmp_path, tiny_smol, chat_file):
    adapter = train(tmp_path, "chat", model=tiny_smol, data=chat_file, steps=20, save_every=20, lr=3e-2,
                    dev_fraction=0.0)  # fmt: skip
    base = eval_main(["--model", tiny_smol, "--data", chat_file, "--out", str(tmp_path / "b"), "--device", "cpu"])
    tuned = eval_main(["--adapter", str(adapter), "--model", tiny_smol, "--data", chat_file,
                       "--out", str(tmp_path / "t"), "--device", "cpu"])  # fmt: skip
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    assert tuned["tokens"] == base["tokens"] > 100
    assert tuned["loss"] < base["loss"] - 0.1  # trained on these rows


def test_code_pass_at_k_for_several_adapters_in_one_run(tmp_path, tiny_smol, chat_file):
    lora = train(tmp_path, "lora", model=tiny_smol, data=chat_file, steps=1, dev_fraction=0.0)
    flora = train(tmp_path, "flora", model=tiny_smol, data=chat_file, steps=1, dev_fraction=0.0, method="flora", r=1)
    for extra in ([f"py={lora}"], [f"py={lora}", f"fl={flora}"]):  # LoRA alone; LoRA and FLoRA rows together
        out = tmp_path / f"code{len(extra)}"
        summary = eval_main(
            ["--task", "code", "--benchmark", "mbpp", "--data", str(MBPP), "--limit", "2", "--base",
             "--max-tokens", "8", "--model", tiny_smol, "--out", str(out), "--device", "cpu"]
            + [a for spec in extra for a in ("--adapter", spec)]
        )  # fmt: skip
        assert set(summary["results"]) == {"base", *[s.split("=")[0] for s in extra]}
        for report in summary["results"].values():
            assert report["n_problems"] == 2 and report["pass@1"] == 0.0  # a random model writes no code
            assert sum(report["status_counts"].values()) == 2
        lines = [json.loads(line) for line in open(out / "predictions.jsonl")]
        assert len(lines) == 2 * (1 + len(extra)) and all(len(r["completions"]) == 1 for r in lines)


def test_code_refusals(tmp_path, tiny_smol):
    with pytest.raises(ValueError, match="--samples"):
        eval_main(["--task", "code", "--base", "--k", "5", "--data", str(MBPP), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="nothing to score"):
        eval_main(["--task", "code", "--data", str(MBPP), "--out", str(tmp_path)])


class Terminal:
    """A stand-in stderr that says it is a terminal (tqdm draws its bar only on one)."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_max_length_defaults_to_the_trained_one_and_a_bar_shows_on_a_terminal(tmp_path, tiny_smol, chat_file,
                                                                               monkeypatch):  # fmt: skip
    import importlib

    data = importlib.import_module("loraflow.finetune.data")  # loraflow.finetune is also a function

    adapter = train(tmp_path, "chat", model=tiny_smol, data=chat_file, steps=1, dev_fraction=0.0)  # max_length=64
    assert json.loads((adapter / "run.json").read_text())["config"]["max_length"] == 64
    lengths, examples = [], data.causal_lm_examples
    monkeypatch.setattr(data, "causal_lm_examples", lambda f, tok, n: lengths.append(n) or examples(f, tok, n))
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    args = ["--model", tiny_smol, "--data", chat_file, "--device", "cpu", "--batch-size", "2"]
    eval_main(["--adapter", str(adapter), *args, "--out", str(tmp_path / "a")])
    assert "eval" in terminal.text and "row" in terminal.text  # tqdm's bar: "eval: 100%|...| 8/8 [...row/s]"
    eval_main(["--adapter", str(adapter), *args, "--out", str(tmp_path / "b"), "--max-length", "100", "--no-progress"])
    (adapter / "run.json").unlink()
    eval_main(["--adapter", str(adapter), *args, "--out", str(tmp_path / "c")])
    assert lengths == [64, 100, 512]


def test_max_length_help_names_its_default(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the --max-length the adapter was trained with (its run.json), else 512" in text
