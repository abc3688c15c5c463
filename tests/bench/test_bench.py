"""The benchmark helpers that run on any machine: workloads, adapters, reports."""

import math
import random
from pathlib import Path

import pytest
import torch

from loraflow.bench import kernels, kernels_report, report, serve, serve_report
from loraflow.serve.registry import factors_for_bank


def test_popularity_mixes():
    rng = random.Random(0)
    assert set(serve.popularity("identical", 50, 64, rng)) == {0}
    assert len(set(serve.popularity("distinct", 64, 64, rng))) == 64
    assert max(serve.popularity("uniform", 64, 64, rng)) < 8  # ceil(sqrt(64)) adapters
    skewed = serve.popularity("skewed", 2000, 64, rng)
    assert skewed.count(0) > skewed.count(10) * 5  # Zipf 1.5 favours the first
    with pytest.raises(ValueError, match="mix"):
        serve.popularity("zipf", 4, 4, rng)


def test_random_adapters_load_as_served_adapters(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj": (8, 16), "model.layers.0.mlp.down_proj": (16, 24)}
    (folder,) = serve.make_adapters(shapes, tmp_path, 1, rank=4)
    factors = factors_for_bank(folder, shapes, r_max=4)
    assert {m: (a.shape, b.shape) for m, (a, b) in factors.items()} == {
        "model.layers.0.self_attn.q_proj": ((4, 16), (8, 4)),
        "model.layers.0.mlp.down_proj": ((4, 24), (16, 4)),
    }
    names = serve.name_folders(tmp_path / "names", [folder], 3)
    assert sorted(p.name for p in names.iterdir()) == ["a0", "a1", "a2"]


def test_random_flora_and_mixed_adapters_load_as_served_adapters(tmp_path):
    """--kind flora / mixed: FLoRA folders the server reads as multiplicative, with M = BA/r
    near one (a random adapter near the base model, as a trained one is); mixed alternates."""
    shapes = {"model.layers.0.self_attn.q_proj": (8, 16), "model.layers.0.mlp.down_proj": (16, 24)}
    lora, flora = serve.make_adapters(shapes, tmp_path, 2, rank=4, kind="mixed")
    assert not factors_for_bank(lora, shapes, r_max=4).multiplicative
    factors = factors_for_bank(flora, shapes, r_max=4)
    assert factors.multiplicative
    for module, (a, c) in factors.items():  # c = B / r: W = W0 ∘ (c a)
        m = c @ a
        assert m.shape == shapes[module] and (m - 1).abs().mean() < 0.2 and (m - 1).abs().max() > 0.01
    assert [factors_for_bank(f, shapes, r_max=4).multiplicative for f in serve.make_adapters(
        shapes, tmp_path / "f", 2, rank=4, kind="flora")] == [True, True]  # fmt: skip
    with pytest.raises(ValueError, match="kind must be one of lora, flora, mixed"):
        serve.Workload(kind="dora")


def test_summary_percentiles():
    results = [{"ttft": 0.1 * i, "itl": [0.01, 0.02], "tokens": 10, "done": 2.0} for i in range(1, 5)]
    s = serve.summarize(results + [{"error": "500: boom"}], t0=0.0)
    assert s["output_tokens"] == 40 and s["output_tokens_per_s"] == pytest.approx(20.0)
    assert s["errors"] == 1 and s["first_error"] == "500: boom"
    assert s["ttft_p50_ms"] == pytest.approx(300.0) and s["itl_p99_ms"] == pytest.approx(20.0)


def test_serve_report_says_what_was_not_measured(tmp_path):
    run = {
        "requests": 2,
        "errors": 0,
        "output_tokens": 8,
        "wall_s": 1.0,
        "output_tokens_per_s": 8.0,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 2.0,
        "itl_p50_ms": 1.0,
        "itl_p99_ms": 2.0,
    }
    payload = {
        "workload": vars(serve.Workload()),
        "adapters": run,
        "base": dict(run, output_tokens_per_s=10.0),
        "adapters_over_base": 0.8,
    }
    env = report.environment()
    text = serve_report.markdown(env, payload)
    assert "**0.80**" in text and "not measured" in text
    paths = report.write(tmp_path, "serve", payload, text, serve_report.figure(payload))
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size for p in paths)


def test_repeated_runs_report_each_kinds_median_run_and_every_pair():
    runs = [{"output_tokens_per_s": v, "ttft_p50_ms": v / 10} for v in (30.0, 10.0, 20.0)]
    assert serve.median_run(runs)["ttft_p50_ms"] == 2.0 and serve.median_run(runs[:2])["output_tokens_per_s"] == 10.0
    run = {
        "requests": 2,
        "errors": 0,
        "output_tokens": 8,
        "wall_s": 1.0,
        "output_tokens_per_s": 9.0,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 2.0,
        "itl_p50_ms": 1.0,
        "itl_p99_ms": 2.0,
    }
    pairs = [{"adapters_tokens_per_s": a, "base_tokens_per_s": 10.0, "ratio": a / 10.0} for a in (8.0, 9.0, 10.0)]
    payload = {
        "workload": vars(serve.Workload()),
        "adapters": run,
        "base": dict(run, output_tokens_per_s=10.0),
        "adapters_over_base": 0.9,
        "pairs": pairs,
    }
    text = serve_report.markdown(report.environment(), payload)
    assert "**0.90**" in text and "median run of 3" in text and "8 / 10 = 0.80, 9 / 10 = 0.90, 10 / 10 = 1.00" in text
    with pytest.raises(ValueError, match="--repeats must be at least 1"):
        serve.run([], serve.Workload(), "base", 100, Path("unused.log"), repeats=0)


def test_step_counters_and_their_report_line():
    metrics = (
        "# TYPE loraflow_graph_steps_total counter\nloraflow_graph_steps_total 120\n"
        "loraflow_graph_step_seconds_total 1.2\nloraflow_prompt_steps_total 4\n"
        "loraflow_prompt_step_seconds_total 0.2\nloraflow_graph_step_seconds_max 0.5\n\n"
    )
    assert serve._step_counters(metrics) == {
        "loraflow_graph_steps_total": 120.0,
        "loraflow_graph_step_seconds_total": 1.2,
        "loraflow_prompt_steps_total": 4.0,
        "loraflow_prompt_step_seconds_total": 0.2,
    }
    steps = {"graph_steps": 120, "graph_step_ms": 10.0, "decode_steps": 0, "decode_step_ms": None,
             "prompt_steps": 4, "prompt_step_ms": 50.0}  # fmt: skip
    pair = {"steps": {"adapters": steps, "base": dict(steps, prompt_steps=0)}}
    (line,) = serve_report.step_lines([pair])
    assert "with adapters graph 120 x 10.00 ms, prompt 4 x 50.00 ms; base graph 120 x 10.00 ms" in line
    assert "captures" not in line
    assert serve._step_counters(metrics + "loraflow_graph_captures_total 3\n")["loraflow_graph_captures_total"] == 3
    pair["steps"]["adapters"] |= {"graph_captures": 3, "graph_capture_s": 1.5}  # inside the graph steps' time
    (line,) = serve_report.step_lines([pair])
    assert "graph 120 x 10.00 ms, prompt 4 x 50.00 ms (3 graph captures in them, 1.50 s); base graph" in line


def test_kernel_grid_and_targets():
    grid = kernels.grid()
    assert {c.kind for c in grid} == {"decode", "prefill", "flora"}
    assert {c.mix for c in grid} == set(kernels.MIXES) and {c.rank for c in grid} >= set(kernels.RANKS)
    rows = [
        {
            "kind": "decode",
            "d_in": 4096,
            "d_out": 4096,
            "rows": 64,
            "rank": 16,
            "mix": "distinct",
            "addon_over_roofline": 1.2,
            "triton_addon_ms": 0.005,
            "roofline_ms": 0.004,
            "speedup_vs_peft": 30.0,
            "triton_layer_ms": 0.02,
            "peft_layer_ms": 0.6,
        }
    ]
    t = kernels_report.targets(rows)
    assert [x["met"] for x in t] == [True, True]


def test_kernel_check_on_the_cpu():
    case = kernels.Case("prefill", 32, 24, 4, 16, 4, "uniform")
    assert kernels.check_case(case, device="cpu", dtype=torch.float32) < 1e-5


def test_train_bench_runs_and_counts_states_on_the_cpu():
    from loraflow.bench import train, train_report

    rows = [
        train.run_case(
            train.TrainCase("tiny", v, pl, rank=8, steps=3, seq=32, update_proj_gap=4, accumulation=acc),
            device="cpu",
            dtype=torch.float32,
        )
        for v, pl, acc in [
            ("adamw", False, 1),
            ("galore", True, 1),
            ("galore", False, 1),
            ("galore-torch", False, 1),
            ("galore", True, 2),
        ]
    ]
    assert rows[0]["state_bytes"] == rows[0]["analytic_state_bytes"] and rows[0]["tokens_per_s"] > 0
    assert rows[0]["svd_seconds"] is None and rows[0]["tokens_per_s"] == rows[0]["steady_tokens_per_s"]
    assert rows[1]["state_bytes"] == rows[1]["analytic_state_bytes"] < rows[0]["state_bytes"]
    assert rows[3]["variant"] == "galore-torch"  # decided in its own test below
    assert rows[4]["state_bytes"] == rows[1]["state_bytes"]  # accumulation adds no state
    for r in [r for r in rows[1:] if "error" not in r]:  # the SVD, amortised over T = 4 steps
        tokens = r["batch"] * r["seq"] * r["accumulation"]  # 32 or 64 a step
        step_s = tokens / r["steady_tokens_per_s"]
        assert r["svd_seconds"] > 0 and r["tokens_per_s"] == pytest.approx(tokens / (step_s + r["svd_seconds"] / 4))
        assert r["tokens_per_s"] < r["steady_tokens_per_s"]
    assert train_report.targets(rows)[0]["met"] is True
    with pytest.raises(ValueError, match="must be <= update_proj_gap"):
        train.TrainCase("tiny", "galore", False, rank=8, steps=6, update_proj_gap=4)


def test_train_bench_runs_apollo_and_mini_with_smaller_states_on_the_cpu():
    from loraflow.bench import train

    rows = {
        v: train.run_case(train.TrainCase("tiny", v, False, rank=8, steps=3, seq=32), device="cpu", dtype=torch.float32)
        for v in ("adamw", "apollo", "apollo-mini")
    }
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["svd_seconds"] is None for r in rows.values())
    assert rows["apollo-mini"]["state_bytes"] < rows["apollo"]["state_bytes"] < rows["adamw"]["state_bytes"]


def _galore_torch_importable() -> bool:
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("variant", ["galore-torch", "galore-torch8bit"])
def test_galore_torch_row_ran_or_says_it_is_missing(variant):
    """Where galore-torch imports, its row has run (numbers, no "error"); where it does not,
    the row says so and carries no numbers."""
    from loraflow.bench import train

    row = train.run_case(
        train.TrainCase("tiny", variant, False, rank=8, steps=3, seq=32, update_proj_gap=4),
        device="cpu",
        dtype=torch.float32,
    )
    if _galore_torch_importable():
        assert "error" not in row, row["error"]
        assert row["tokens_per_s"] > 0 and row["steady_tokens_per_s"] > 0 and row["svd_seconds"] > 0
        assert row["state_bytes"] > 0 and row["analytic_state_bytes"] is None  # its states, not counted by us
        assert row["params"] > 0 and math.isfinite(row["loss"])
    else:
        assert row["error"].startswith("not available: ") and "galore_torch" in row["error"]
        assert not {"tokens_per_s", "steady_tokens_per_s", "svd_seconds", "state_bytes"} & set(row)
        assert row["variant"] == variant  # the case is still described


def test_train_merge_keeps_every_part_and_its_date_and_command(tmp_path):
    import json

    from loraflow.bench import train
    from loraflow.cli import main

    row = train.run_case(
        train.TrainCase("tiny", "adamw", False, rank=8, steps=3, seq=32), device="cpu", dtype=torch.float32
    )
    files = []
    for i, (date, variant) in enumerate([("2026-11-29 02:22 UTC", "adamw"), ("2026-11-29 03:37 UTC", "galore")]):
        env = dict(report.environment(), date=date, command=f"part {i}")
        files.append(tmp_path / f"p{i}.json")
        files[-1].write_text(json.dumps({"environment": env, "cases": [dict(row, variant=variant)]}))
    main(["bench", "train", "--merge", *map(str, files), "--out", str(tmp_path / "out")])
    merged = json.loads((tmp_path / "out" / "train-cuda.json").read_text())
    assert [c["variant"] for c in merged["cases"]] == ["adamw", "galore"]
    assert merged["environment"]["date"] == "2026-11-29 02:22 UTC, 2026-11-29 03:37 UTC"
    assert merged["environment"]["command"] == "part 0 + part 1"
    assert "2026-11-29 03:37 UTC" in (tmp_path / "out" / "train-cuda.md").read_text()


def test_refresh_timing_counts_one_svd_per_weight_shape(monkeypatch):
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    import loraflow as lf
    from loraflow.bench import train

    model = LlamaForCausalLM(lf.llama_config("tiny", vocab_size=300, max_seq_len=16))
    group = lf.galore_param_groups(model, rank=4)[0]
    shapes = []
    clock = [0.0]  # a clock that only the basis routine advances: no real time measured
    cost = {(64, 64): 1.0, (64, 172): 10.0, (172, 64): 100.0}  # "seconds" per SVD of each shape

    def routine(g, grp):
        shapes.append(tuple(g.shape))
        clock[0] += cost[tuple(g.shape)]

    monkeypatch.setattr(train, "basis_routine", lambda variant: routine)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    seconds = train.refresh_seconds(model, torch.randint(0, 300, (2, 16)), group, "galore", "cpu")
    assert sorted(shapes) == [(64, 64), (64, 172), (172, 64)]  # one of each: 8 + 2 + 4 weights of 2 layers
    assert seconds == 8 * 1.0 + 2 * 10.0 + 4 * 100.0  # each shape's time once per weight of it
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.undo()
    basis = train.basis_routine("galore")(torch.randn(64, 172), group)  # 64 x 172 projects on the left
    assert basis.shape == (64, 4) and torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)


def test_decode_roofline_counts_weights_cache_and_adapters():
    from loraflow.serve.llama import SHAPES, LlamaArgs

    shape = LlamaArgs(**SHAPES["llama2-7b"])
    r = serve.decode_roofline(shape, serve.Workload(requests=64, prompt_len=128, output_len=128, adapters=64))
    assert abs(r["weights_gb"] - 6.738e9 * 2 / 1e9) < 0.01  # Llama-2-7B: 6.74B parameters
    assert r["kv_gb"] == 64 * 192 * (2 * 32 * 4096 * 2) / 1e9  # 512 KB per token at context 192
    assert r["distinct_adapters"] == 64
    assert abs(r["adapters_gb"] / 64 - 16 * 32 * (4 * 8192 + 3 * 15104) * 2 / 1e9) < 1e-9
    assert 0.79 < r["ratio_bound"] < 0.80
    one = serve.decode_roofline(shape, serve.Workload(mix="identical"))
    assert one["distinct_adapters"] == 1 and one["ratio_bound"] > 0.99


TINY = dict(  # a Llama shape small enough for the CPU (tests/serve's ARGS, two layers)
    vocab_size=91,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    intermediate=96,
    norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_seq_len=128,
    tie_embeddings=False,
    qkv_bias=False,
    mlp_bias=False,
)


def test_hf_baseline_runs_the_servers_weights_and_prompts_one_batch_on_the_cpu():
    from loraflow.bench import hf_generate
    from loraflow.serve.llama import LlamaArgs, random_llama

    shape = LlamaArgs(**TINY)
    model = hf_generate.hf_model("tiny", shape, "cpu")
    ours = random_llama(shape, torch.float32, "cpu", seed=0).state_dict()  # `loraflow serve --random-weights`
    theirs = model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    w = serve.Workload(requests=3, prompt_len=8, output_len=5)
    prompts = serve.workload_prompts(w, shape.vocab_size)
    assert prompts == serve.workload_prompts(w, shape.vocab_size) and {len(p) for p in prompts} == {8}
    rows = hf_generate.baseline(model, prompts, w.output_len, repeats=2)
    assert "compiled" not in rows and "CUDA" in rows["compiled_note"] and "one batch" in rows["batching"]
    eager = rows["eager"]
    assert eager["output_tokens"] == w.requests * w.output_len and eager["batch"] == w.requests
    assert len(eager["runs"]) == 2 and all(r["output_tokens"] == 15 for r in eager["runs"])
    assert eager["output_tokens_per_s"] == pytest.approx(15 / eager["wall_s"]) and eager["cache"] == "dynamic"
    assert eager["output_tokens_per_s"] in sorted(r["output_tokens_per_s"] for r in eager["runs"])[:1]  # lower middle
    # greedy: the same tokens with a static cache; each row gets exactly output_len new ones, eos or not
    first = hf_generate.generate_row(model, prompts, 5, 1, "eager", keep_tokens=True)["tokens"]
    static = hf_generate.generate_row(model, prompts, 5, 1, "static", keep_tokens=True)
    assert static["tokens"] == first and static["cache"] == "static" and static["compiled"] is False
    eos = first[0][0]
    model.generation_config.eos_token_id = eos  # row 0's first token: min_new_tokens holds it back
    again = hf_generate.generate_row(model, prompts, 5, 1, "static", keep_tokens=True)["tokens"]
    assert [len(t) for t in again] == [5, 5, 5] and eos not in again[0]
    assert again[1:] == first[1:] or any(eos in t for t in first[1:])
    assert hf_generate.ratios(rows, 3 * eager["output_tokens_per_s"]) == {"ours_over_hf_eager": pytest.approx(3.0)}
    with pytest.raises(ValueError, match="CUDA only"):
        hf_generate.generate_row(model, prompts, 5, 1, "compiled")
    with pytest.raises(ValueError, match="one length"):
        hf_generate.generate_row(model, [[3, 4], [5]], 5, 1, "eager")


def _serve_payload(**extra) -> dict:
    run = {
        "requests": 64,
        "errors": 0,
        "output_tokens": 8192,
        "wall_s": 4.0,
        "output_tokens_per_s": 2048.0,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 2.0,
        "itl_p50_ms": 1.0,
        "itl_p99_ms": 2.0,
    }
    return {
        "workload": vars(serve.Workload()),
        "adapters": run,
        "base": dict(run, output_tokens_per_s=2560.0),
        "adapters_over_base": 0.8,
        **extra,
    }


def _hf_row(kind: str, tok_s: list[float]) -> dict:
    runs = [{"output_tokens": 8192, "wall_s": 8192 / v, "output_tokens_per_s": v} for v in tok_s]
    median = sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]
    return dict(median, kind=kind, compiled=kind == "compiled", requests=64, batch=64, output_len=128, runs=runs)


def test_serve_report_has_the_hf_rows_and_ours_over_them(tmp_path):
    hf = {"batching": "one batch", "compiled": _hf_row("compiled", [1000, 1024, 990]), "eager": _hf_row("eager", [512])}
    payload = _serve_payload(hf_generate=hf)
    text = serve_report.markdown(report.environment(), payload)
    assert "| transformers generate, static cache + torch.compile, no adapters | 1000.0 |" in text
    assert "| transformers generate, dynamic cache, eager, no adapters | 512.0 |" in text
    assert "generate: **2.05x** (target >= 1.5x); base model only / it: 2.56x" in text  # 2048 / 1000
    assert "eager generate: 4.00x" in text and "compiled 1000, 1024, 990; eager 512" in text
    assert "no continuous batching" in text and "one batch of 64 rows" in text
    paths = report.write(tmp_path, "serve", payload, text, serve_report.figure(payload))
    assert all(p.stat().st_size for p in paths)
    cpu = serve_report.markdown(
        report.environment(), _serve_payload(hf_generate={"compiled_note": "needs CUDA", "eager": hf["eager"]})
    )
    assert "compiled static-cache generate: not measured (needs CUDA)" in cpu and "static cache +" not in cpu
    assert "transformers generate" not in serve_report.markdown(report.environment(), _serve_payload())


def test_bench_serve_takes_hf_baseline(monkeypatch):
    from loraflow import cli
    from loraflow.bench import commands

    seen = []
    monkeypatch.setattr(commands, "cmd_bench_serve", seen.append)
    cli.main(["bench", "serve", "--shape", "llama2-7b", "--hf-baseline", "--repeats", "3"])
    cli.main(["bench", "serve", "--kind", "mixed"])
    assert [a.hf_baseline for a in seen] == [True, False] and seen[0].repeats == 3
    assert [a.kind for a in seen] == ["lora", "mixed"]


def test_many_names_over_few_files_and_the_tier_line(tmp_path, monkeypatch):
    """10,000 names need not be 10,000 folders (``--adapter-files``): names link round robin; the
    workload refuses fewer names than adapters; the report gives each tier's mean time."""
    import pytest

    from loraflow import cli
    from loraflow.bench import commands

    w = serve.Workload(adapters=1000, registered=10000, files=8)
    assert w.folders == 8 and serve.Workload(adapters=5).folders == 5
    with pytest.raises(ValueError, match="--registered"):
        serve.Workload(adapters=64, registered=10)
    with pytest.raises(ValueError, match="--adapter-files"):
        serve.Workload(adapters=4, files=5)
    folders = [tmp_path / f"f{i}" for i in range(3)]
    for f in folders:
        f.mkdir()
    names = serve.name_folders(tmp_path / "names", folders, 7)
    assert [(names / f"a{i}").resolve().name for i in range(7)] == ["f0", "f1", "f2", "f0", "f1", "f2", "f0"]
    metrics = {"loraflow_adapter_loads_total": 4.0, "loraflow_adapter_load_seconds_total": 0.2,
               "loraflow_adapter_slot_writes_total": 5.0, "loraflow_adapter_slot_write_seconds_total": 0.01,
               "loraflow_adapter_hit_rate": 0.5}  # fmt: skip
    (line,) = serve_report.tier_lines(metrics)
    assert "4 loads" in line and "50.0 ms each" in line and "5 writes" in line and "2.00 ms" in line
    assert serve_report.tier_lines({}) == []
    seen = []
    monkeypatch.setattr(commands, "cmd_bench_serve", seen.append)
    cli.main(["bench", "serve", "--adapters", "1000", "--adapter-files", "64", "--max-cpu-adapters", "256"])
    assert seen[0].adapter_files == 64 and seen[0].max_cpu_adapters == 256
