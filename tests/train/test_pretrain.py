"""loraflow pretrain on tinyshakespeare: it learns, and a resumed run equals an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_corpus import _corpus  # n files of tinyshakespeare

from loraflow.train.pretrain import lr_factor, main

DATA = Path(__file__).parents[2] / "examples" / "data" / "tinyshakespeare" / "input.txt"
ARGS = [
    "--data",
    str(DATA),
    "--config",
    "tiny",
    "--rank",
    "8",
    "--update-proj-gap",
    "4",
    "--warmup",
    "2",
    "--batch",
    "4",
    "--seq",
    "48",
    "--lr",
    "3e-3",
    "--eval-seqs",
    "8",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> list[str]:
    """ARGS reading tinyshakespeare's token ids from one --tokens-cache, tokenized once for the
    module (a second a run otherwise); test_tokens_cache_round_trip checks that a cache gives
    the ids, losses and eval loss of tokenizing, and its runs tokenize."""
    folder = tmp_path_factory.mktemp("tokens")
    cache = str(folder / "ids.safetensors")
    main(ARGS + ["--prepare-only", "--tokens-cache", cache, "--out", str(folder / "prepare")])
    return ARGS + ["--tokens-cache", cache]


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_pretraining_lowers_the_held_out_loss(tmp_path, cached, dtype):
    # 6 steps at 1e-2, across projection redraws (bfloat16 matmuls are 5x slower than float32 on the CPU)
    steps = ["--steps", "6", "--eval-every", "2", "--lr", "1e-2", "--update-proj-gap", "2"]
    main(cached + ["--optimizer", "galore", *steps, "--dtype", dtype, "--out", str(tmp_path)])
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert [r["tokens"] for r in evals] == [4 * 48 * k for k in (2, 4, 6)]
    assert all(r["tokens_per_s"] > 0 for r in evals) and not any("tokens_per_s" in r for r in records if r not in evals)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "complete.json",
        "config.json",
        "model.safetensors",
        "state.pt",
    ]
    weights = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # bf16-mixed: float32 weights too


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "galore8bit"],
        ["--optimizer", "galore", "--per-layer", "--accumulation", "2"],
        ["--optimizer", "apollo", "--update-proj-gap", "2"],  # resumed across a projection redraw
        ["--optimizer", "apollo-mini", "--per-layer"],
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, cached, extra):
    common = cached + extra + ["--eval-every", "100", "--save-every", "3"]
    main(common + ["--steps", "6", "--out", str(tmp_path / "straight")])
    main(common + ["--steps", "3", "--out", str(tmp_path / "split")])
    main(common + ["--steps", "6", "--out", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_time_limit_stops_with_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, cached):
    common = cached + ["--eval-every", "3", "--steps", "6"]
    main(common + ["--out", str(tmp_path / "straight")])
    stopped = main(common + ["--out", str(tmp_path / "split"), "--time-limit", "0"])
    assert stopped["step"] == 1 and "stopped at step 1 of 6" in stopped["stopped"] and stopped["tokens_per_s"] > 0
    with open(tmp_path / "split" / "log.jsonl", "a") as log:  # written after the checkpoint, then killed
        log.write(json.dumps({"step": 2, "loss": 99.0}) + "\n")
    main(common + ["--out", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and 99.0 not in [r["loss"] for r in records]
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 3, 6]


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
    result = main(
        ARGS
        + [
            "--optimizer",
            "adamw",
            "--steps",
            "4",
            "--eval-every",
            "4",
            "--low-rank",
            "4",
            "--train-tokenizer",
            "400",
            "--out",
            str(tmp_path),
        ]
    )
    assert result["eval_loss"] > 0 and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_tokens_cache_round_trip(tmp_path, monkeypatch):
    from loraflow.train import corpus, pretrain

    run = ARGS + ["--optimizer", "galore", "--steps", "4", "--eval-every", "2"]
    cache = tmp_path / "ids.safetensors"
    plain = main(run + ["--out", str(tmp_path / "plain")])
    written = main(run + ["--out", str(tmp_path / "written"), "--tokens-cache", str(cache)])
    monkeypatch.setattr(corpus, "corpus_ids", lambda *a: pytest.fail("the cache was not used"))
    loaded = main(run + ["--out", str(tmp_path / "loaded"), "--tokens-cache", str(cache)])
    assert plain["eval_loss"] == written["eval_loss"] == loaded["eval_loss"]
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / name / "log.jsonl"))] for name in ("plain", "loaded")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    ids = load_file(cache)
    monkeypatch.undo()
    train, held_out = corpus.read_corpus(
        DATA, pretrain.load_tokenizer(pretrain.parse_args(run + ["--out", "x"]), tmp_path)
    )
    assert ids["train"].dtype == torch.int32 and torch.equal(ids["train"].long(), train)
    assert torch.equal(ids["eval"].long(), held_out)


def test_prepare_only_and_a_cache_of_another_tokenizer(tmp_path):
    cache = str(tmp_path / "ids.safetensors")
    prep = ARGS + ["--prepare-only", "--tokens-cache", cache]
    counts = main(prep + ["--out", str(tmp_path / "a")])
    ids = load_file(cache)
    total = counts["train_tokens"] + counts["eval_tokens"]
    assert counts["train_tokens"] == len(ids["train"]) == int(0.95 * total) and len(ids["eval"]) == total - int(
        0.95 * total
    )
    assert not (tmp_path / "a" / "log.jsonl").exists()
    with pytest.raises(ValueError, match=f"a tokenizer of {counts['vocab_size']} tokens, this one has 300"):
        main(prep + ["--train-tokenizer", "300", "--out", str(tmp_path / "b")])
    folder = _corpus(tmp_path / "c", 3, 2000)
    with pytest.raises(ValueError, match="made from 1 files, --data .* has 3"):
        main(prep[2:] + ["--data", str(folder), "--out", str(tmp_path / "c")])


def test_svd_choice_reaches_the_galore_group():
    from transformers import LlamaForCausalLM

    import loraflow as lf
    from loraflow.train.pretrain import optimizer_parts, parse_args

    model = LlamaForCausalLM(lf.llama_config("tiny", vocab_size=64, max_seq_len=16))
    for flags, method in [([], "gram"), (["--svd", "full"], "full"), (["--randomized-svd"], "randomized")]:
        args = parse_args(["--data", "x", "--out", "y", "--rank", "4", *flags])
        groups, make = optimizer_parts("galore", model, args)
        assert groups[0]["svd"] == method and make(groups).param_groups[0]["svd"] == method


def test_compiled_training_logs_the_eager_losses(tmp_path, cached):
    from torch._dynamo.utils import counters

    common = cached + ["--optimizer", "adamw", "--steps", "3", "--eval-every", "100"]
    main(common + ["--out", str(tmp_path / "eager")])
    counters.clear()
    try:
        main(common + ["--out", str(tmp_path / "compiled"), "--compile"])
    except Exception as e:  # no C++ compiler for Inductor's CPU kernels, say
        if "inductor" in type(e).__module__ or "Compiler" in str(e):
            pytest.skip(f"torch.compile cannot run here: {e}")
        raise
    assert counters["stats"]["unique_graphs"] >= 1
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / n / "log.jsonl")] for n in ("eager", "compiled")]
    assert len(logs[0]) == 3 and logs[1] == pytest.approx(logs[0], rel=1e-3)
