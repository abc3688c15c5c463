"""The engine's greedy output equals transformers (+ PEFT) generate, request by request."""

import pytest
from helpers import peft_adapter, prompt, tiny_llama_folder
from helpers import reference as hf_reference

import loraflow as lf
from loraflow.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tiny_llama_folder(root / "base")
    adapters = {
        "sql": peft_adapter(root / "base", root / "sql", 4, ["q_proj", "v_proj"], seed=1),
        "med": peft_adapter(root / "base", root / "med", 8, ["q_proj", "k_proj", "o_proj", "down_proj"], seed=2),
        "py": peft_adapter(root / "base", root / "py", 2, "all-linear", seed=3),
    }
    return root, adapters


def reference(root, adapter_path, text, max_tokens):
    return hf_reference(root / "base", adapter_path, text, max_tokens)


def engine(setup, **kw):
    root, adapters = setup
    return lf.Engine(model=root / "base", adapters={k: str(v) for k, v in adapters.items()}, device="cpu", **kw)


def decode_only_step(eng, reqs) -> bool:
    """Run one step; whether every request it advanced advanced by one token (a decode-only
    step: the CUDA-graph path runs exactly these)."""
    before = [r.computed for r in reqs]
    eng.step()
    moved = [r.computed - c for r, c in zip(reqs, before) if r.computed != c]
    return bool(moved) and all(m == 1 for m in moved)


GRAPHS = [
    False,
    pytest.param(
        True,
        marks=pytest.mark.skipif(
            __import__("torch").cuda.is_available(),
            reason="CPU tensors through the Triton interpreter; on a GPU see the CUDA test",
        ),
    ),
]


PAGED = GRAPHS[1].marks  # the paged-decode path's skip on a GPU
MIXED_BATCH = [
    pytest.param(
        g,
        s,
        r,
        k,
        id=f"{'paged-decode' if g else 'gathered'}-bank-{s}x{r}" + (f"-{k}" if k != "rows" else ""),
        marks=PAGED if g else (),
    )
    for g, s, r, k in [
        (False, 8, 64, "rows"),
        (False, 3, 8, "rows"),
        (True, 8, 64, "rows"),
        (True, 3, 8, "rows"),
        (True, 8, 64, "fused"),
        (True, 8, 64, "siblings"),
    ]
]


@pytest.mark.parametrize("graphs,slots,rank,kernel", MIXED_BATCH)
def test_greedy_equals_transformers_and_peft_per_adapter_in_one_mixed_batch(setup, graphs, slots, rank, kernel):
    """``graphs``: decode-only steps through the fixed buffers, paged attention and LoRA of
    the CUDA-graph path (run eagerly here, under Triton's interpreter). The adapters (ranks
    4, 8, 2) in a bank of 8 slots x 64 rows go through the per-row kernels (``kernel``, a
    choice of that path: shrink and expand, both in one launch, or q/k/v and gate/up sharing
    theirs; gathered rows on the CPU); in a bank of 3 x 8, through the masked whole bank
    while all three decode."""
    root, adapters = setup
    eng = engine(setup, max_batch_tokens=64, decode_graphs=graphs, max_gpu_adapters=slots, max_lora_rank=rank)
    if graphs:
        eng.graphs.kernel = kernel
    assert eng.bank.n_slots == slots and eng.bank.r_max == rank
    names = ["sql", None, "med", "py", "sql", "med"]
    prompts = [prompt(i, 5 + 3 * i) for i in range(len(names))]
    params = SamplingParams(max_tokens=8, temperature=0.0)  # each step is slow under the interpreter
    reqs = [eng.add_request(p, params, a) for p, a in zip(prompts, names)]
    decode_steps = 0
    while not all(r.finished for r in reqs):
        decode_steps += decode_only_step(eng, reqs)
    assert decode_steps >= 6
    assert (eng.graphs.steps == decode_steps) if graphs else eng.graphs is None, (
        decode_steps,
        eng.graphs and eng.graphs.steps,
    )
    if graphs:
        assert eng.graphs.paths["mask" if slots == 3 else "rows"] >= 5
        assert slots == 3 or not eng.graphs.paths["mask"]
    for r, p, a in zip(reqs, prompts, names):
        assert r.output_ids == reference(root, adapters.get(a), p, 8), (a, p)
    assert eng.kv.used_blocks == 0 and not eng.running


@pytest.mark.parametrize("graphs", GRAPHS, ids=["gathered", "paged-decode"])
def test_requests_arriving_mid_decode_and_chunked_prompts(setup, graphs):
    root, adapters = setup
    eng = engine(setup, max_batch_tokens=8, decode_graphs=graphs)  # prompts longer than a step: chunked
    n_groups, build = [], eng.runner.batch

    def spy(plan):
        batch, sample_from = build(plan)
        n_groups.append(len(batch.groups))
        return batch, sample_from

    eng.runner.batch = spy
    first = eng.add_request(prompt(10, 20), SamplingParams(max_tokens=10, temperature=0), "med")
    for _ in range(4):
        eng.step()
    later = [
        eng.add_request(prompt(11 + i, 9), SamplingParams(max_tokens=6, temperature=0), a)
        for i, a in enumerate(["py", None, "sql"])
    ]
    while eng.has_work():
        eng.step()
    assert 2 in n_groups  # steps with decode tokens and prompt chunks: two attention groups
    assert first.output_ids == reference(root, adapters["med"], prompt(10, 20), 10)
    for i, (r, a) in enumerate(zip(later, ["py", None, "sql"])):
        assert r.output_ids == reference(root, adapters.get(a), prompt(11 + i, 9), 6)


@pytest.mark.parametrize("graphs", GRAPHS, ids=["gathered", "paged-decode"])
def test_stale_nan_in_reused_cache_blocks_does_not_reach_other_requests(setup, graphs):
    """Blocks freed by a request whose adapter overflowed hold NaN and inf; the next requests
    get them back, and padded context positions (shorter prompts beside longer ones) must
    not read them: a masked score's weight is 0, but 0 · NaN is NaN."""
    root, adapters = setup
    eng = engine(setup, max_batch_tokens=64, decode_graphs=graphs)
    handed_out = eng.kv.n_blocks * eng.kv.block_size  # every row a request can own
    for k, v in eng.kv.layers:
        k[:handed_out] = float("nan")
        v[:handed_out] = float("inf")
    names, prompts = ["sql", None, "med"], [prompt(20 + i, 3 + 7 * i) for i in range(3)]
    reqs = [eng.add_request(p, SamplingParams(max_tokens=5, temperature=0), a) for p, a in zip(prompts, names)]
    while eng.has_work():
        eng.step()
    for r, p, a in zip(reqs, prompts, names):
        assert r.output_ids == reference(root, adapters.get(a), p, 5), (a, p)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU tensors through the Triton interpreter")
def test_decode_steps_with_the_context_split_across_programs(setup):
    """The paged kernel's context split in 3 (partial softmaxes, then the combine launch) gives
    the reference's greedy tokens for contexts longer and shorter than 3 key blocks."""
    root, adapters = setup
    eng = engine(setup, max_batch_tokens=64, decode_graphs=True)
    eng.runner.graphs.attention_splits, eng.runner.graphs.attention_warps = 3, 2
    names, prompts = ["sql", None, "med"], [prompt(30 + i, 2 + 19 * i) for i in range(3)]
    reqs = [eng.add_request(p, SamplingParams(max_tokens=6, temperature=0), a) for p, a in zip(prompts, names)]
    while eng.has_work():
        eng.step()
    assert eng.runner.graphs.steps >= 4
    for r, p, a in zip(reqs, prompts, names):
        assert r.output_ids == reference(root, adapters.get(a), p, 6), (a, p)


def test_generate_api_and_sampling_options(setup):
    eng = engine(setup)
    outs = eng.generate([prompt(1, 6), prompt(2, 6)], adapters=["sql", None], max_tokens=5, temperature=0.0)
    assert len(outs) == 2 and all(isinstance(o, str) and o for o in outs)
    a = eng.generate([prompt(3, 6)], max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    b = eng.generate([prompt(3, 6)], max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    assert a == b
    words = outs[0].split()
    stopped = eng.generate([prompt(1, 6)], adapters=["sql"], max_tokens=5, temperature=0.0, stop=[words[1]])
    assert stopped[0] == outs[0][: outs[0].index(words[1])]


def test_generate_takes_more_prompts_than_the_queue_holds(setup):
    prompts = [prompt(i, 5) for i in range(7)]
    names = ["sql", None, "py", "med", None, "sql", "py"]
    want = engine(setup).generate(prompts, adapters=names, max_tokens=3, temperature=0.0)
    got = engine(setup, max_waiting=2).generate(prompts, adapters=names, max_tokens=3, temperature=0.0)
    assert got == want


def test_bad_requests_are_refused(setup):
    eng = engine(setup, kv_cache_bytes=64 * 2**10)
    with pytest.raises(KeyError):
        eng.add_request("w1 w2", adapter="nope")
    with pytest.raises(ValueError, match="context holds"):
        eng.add_request(prompt(0, eng.max_len + 5))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_eviction_with_two_slots_and_five_adapters(setup, tmp_path):
    root, adapters = setup
    extra = {f"x{i}": peft_adapter(root / "base", tmp_path / f"x{i}", 2, ["v_proj"], seed=20 + i) for i in range(2)}
    eng = lf.Engine(
        model=root / "base",
        adapters={**{k: str(v) for k, v in adapters.items()}, **extra},
        device="cpu",
        max_gpu_adapters=2,
        max_batch_tokens=32,
    )
    names = ["sql", "med", "py", "x0", "x1", "sql", "py"]
    reqs = [
        eng.add_request(prompt(30 + i, 6), SamplingParams(max_tokens=4, temperature=0), a) for i, a in enumerate(names)
    ]
    while not all(r.finished for r in reqs):
        eng.step()
        assert len(eng.registry.device) <= 2
    all_paths = {**adapters, **extra}
    for i, (r, a) in enumerate(zip(reqs, names)):
        assert r.output_ids == reference(root, all_paths[a], prompt(30 + i, 6), 4), a
    assert eng.registry.stats["evictions"] >= 3


def test_default_model_answers_through_the_engine():
    eng = lf.Engine(device="cpu", max_batch_tokens=256)
    chat = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    out = eng.generate([chat], max_tokens=16, temperature=0.0)
    assert "Paris" in out[0], out


def test_linear_shapes_match_the_bank(setup):
    from loraflow.serve.llama import linear_shapes

    eng = engine(setup)
    assert linear_shapes(eng.model.args) == eng.bank.shapes()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the engine's CUDA path (Triton) needs a GPU")
@pytest.mark.parametrize(
    "slots,rank,kernel",
    [(8, 64, "siblings"), (3, 8, "siblings"), (8, 64, "rows"), (8, 64, "fused")],
    ids=["bank-8x64", "bank-3x8", "bank-8x64-rows", "bank-8x64-fused"],
)  # mostly free, all in use
def test_cuda_engine_equals_transformers_and_peft(setup, slots, rank, kernel):
    import torch

    root, adapters = setup
    eng = lf.Engine(
        model=root / "base",
        adapters={k: str(v) for k, v in adapters.items()},
        device="cuda",
        dtype=torch.float32,
        max_batch_tokens=64,
        max_gpu_adapters=slots,
        max_lora_rank=rank,
    )
    eng.graphs.kernel = kernel  # the decode graphs' LoRA launches
    names = ["sql", None, "med", "py"]
    prompts = [prompt(50 + i, 6 + 2 * i) for i in range(len(names))]
    reqs = [eng.add_request(p, SamplingParams(max_tokens=8, temperature=0.0), a) for p, a in zip(prompts, names)]
    decode_steps = 0
    while not all(r.finished for r in reqs):
        decode_steps += decode_only_step(eng, reqs)
    assert decode_steps >= 5 and eng.graphs.steps == decode_steps  # decode steps replayed CUDA graphs
    assert eng.graphs.graphs and eng.graphs.paths["rows"] >= 3 and not eng.graphs.paths["mask"]  # Triton on CUDA
    for r, p, a in zip(reqs, prompts, names):
        assert r.output_ids == reference(root, adapters.get(a), p, 8), (a, p)


def test_updates_carry_every_token_text_in_order_while_the_text_trails_a_step(setup):
    """A running request's newest text is extended while the next step runs (``_flush_text``):
    each step's update still carries all the text so far, one update a token, the last one
    finished with the whole text; an abort's update holds the text of every token before it;
    a request with a stop string has its text at once (it is searched for it)."""
    root, adapters = setup
    eng = engine(setup)
    seen: dict[str, list] = {"a": [], "b": [], "s": []}
    record = {k: (lambda r, k=k: seen[k].append((eng.stream_text(r), len(r.output_ids), r.finished))) for k in seen}
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = eng.add_request(prompt(0, 5), p, "sql", on_output=record["a"])
    b = eng.add_request(prompt(1, 5), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), None,
                        on_output=record["b"])  # fmt: skip
    stop_on = eng.tokenizer.decode(reference(root, None, prompt(2, 5), 3)[2:3])
    s = eng.add_request(prompt(2, 5), SamplingParams(max_tokens=12, temperature=0.0, stop=[stop_on]), None,
                        on_output=record["s"])  # fmt: skip
    while not a.finished:
        eng.step()
    eng.step()
    eng.abort(b.id)
    while eng.has_work():
        eng.step()
    want = eng.tokenizer.decode(reference(root, adapters["sql"], prompt(0, 5), 6), skip_special_tokens=True)
    assert a.text == want and seen["a"][-1] == (want, 6, True)
    assert [n for _, n, _ in seen["a"]] == [1, 2, 3, 4, 5, 6]  # one update a token
    for (t0, _, _), (t1, _, _) in zip(seen["a"], seen["a"][1:]):
        assert t1.startswith(t0)
    assert seen["a"][-2][0] == eng.tokenizer.decode(a.output_ids[:5], skip_special_tokens=True)
    assert b.finish_reason == "abort" and seen["b"][-1][2]
    assert seen["b"][-1][0] == eng.tokenizer.decode(b.output_ids, skip_special_tokens=True)
    assert s.finish_reason == "stop" and stop_on not in s.text and [f for *_, f in seen["s"]].count(True) == 1


def test_preempted_requests_are_recomputed_and_still_equal_the_reference(setup):
    """A KV cache of 12 blocks of 4 tokens for four requests of 16 tokens each: the latest
    admitted give their blocks back and are recomputed later; every output equals transformers'."""
    root, adapters = setup
    eng = engine(setup, block_size=4, kv_cache_bytes=12 * 2 * 2 * 4 * 2 * 16 * 4, max_batch_tokens=64)
    assert eng.kv.n_blocks == 12
    names = ["sql", None, "med", "py"]
    prompts = [prompt(i, 6) for i in range(4)]
    # the adapters onto the device first (they load on a thread): the four requests are then
    # admitted in one step, and their growth to 16 tokens (16 blocks) must preempt
    eng.generate(prompts[:1] * 4, adapters=names, max_tokens=1, temperature=0.0)
    assert eng.stats["preemptions"] == 0
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request(p, params, a) for p, a in zip(prompts, names)]
    while eng.has_work():
        eng.step()
    assert eng.stats["preemptions"] >= 1
    for r, p, a in zip(reqs, prompts, names):
        assert r.finish_reason == "length" and r.output_ids == reference(root, adapters.get(a), p, 10), (a, p)
    assert eng.kv.used_blocks == 0 and not eng.running
