"""loraflow pretrain on tinyshakespeare: it learns, and a resumed run equals an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraflow.train.pretrain import lr_factor, main

DATA = Path(__file__).parents[2] / "examples" / "data" / "tinyshakespeare" / "input.txt"
ARGS = ["--data", str(DATA), "--config", "tiny", "--rank", "8", "--update-proj-gap", "4", "--warmup", "2",
        "--batch", "4", "--seq", "48", "--lr", "3e-3", "--eval-seqs", "8", "--device", "cpu"]


def test_pretraining_lowers_the_held_out_loss(tmp_path):
    main(ARGS + ["--optimizer", "galore", "--steps", "16", "--eval-every", "4", "--out", str(tmp_path)])
    evals = [r["eval_loss"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["config.json", "model.safetensors", "state.pt"]


@pytest.mark.parametrize("extra", [["--optimizer", "galore8bit"], ["--optimizer", "galore", "--per-layer",
                                                                   "--accumulation", "2"]])
def test_resume_equals_an_uninterrupted_run(tmp_path, extra):
    common = ARGS + extra + ["--eval-every", "100", "--save-every", "3"]
    main(common + ["--steps", "6", "--out", str(tmp_path / "straight")])
    main(common + ["--steps", "3", "--out", str(tmp_path / "split")])
    main(common + ["--steps", "6", "--out", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_and_errors(tmp_path):
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(ARGS + ["--steps", "2", "--out", str(tmp_path), "--resume"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        main(ARGS[2:] + ["--data", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "o")])


def test_low_rank_baseline_and_a_trained_tokenizer(tmp_path):
    from transformers import LlamaForCausalLM

    import loraflow as lf
    from loraflow.train.lowrank import LowRankLinear, to_low_rank

    model = LlamaForCausalLM(lf.llama_config("tiny", vocab_size=300))
    full = sum(p.numel() for p in model.parameters())
    names = to_low_rank(model, 4)
    assert len(names) == 14 and isinstance(model.model.layers[0].mlp.down_proj, LowRankLinear)
    assert sum(p.numel() for p in model.parameters()) < full
    result = main(ARGS + ["--optimizer", "adamw", "--steps", "4", "--eval-every", "4", "--low-rank", "4",
                          "--train-tokenizer", "400", "--out", str(tmp_path)])
    assert result["eval_loss"] > 0 and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
