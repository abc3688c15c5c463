"""Tensor-parallel serving: shards of every layer, with LoRA and FLoRA slots, add up to the whole
layer; a 2-process engine (gloo) gives the one-process engine's tokens; sizes that do not
split are refused."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from helpers import peft_adapter, prompt, tiny_llama_folder
from test_flora_serving import flora_adapter

import loraflow as lf
from loraflow.serve.bank import AdapterBank, BankedLinear, TokenSlots
from loraflow.serve.llama import LlamaArgs, random_llama
from loraflow.serve.sampling import SamplingParams
from loraflow.serve.tensor_parallel import RowParallelLinear, TensorParallel, check_divisible, shard_llama

HERE = Path(__file__).parent
ARGS = LlamaArgs(vocab_size=91, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=96,
                 norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, max_seq_len=64, tie_embeddings=False,
                 qkv_bias=True, mlp_bias=True)  # fmt: skip


def random_factors(shapes, r, seed, flora=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in shapes.items():
        a, c = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) / (1 if flora else 8)
        out[name] = (1 + 0.3 * a, c / r) if flora else (a, c)
    return out


@pytest.mark.parametrize("n_tokens", [5, 40], ids=["gathered-rows", "per-slot-groups"])
def test_shards_of_every_layer_add_up_to_the_whole_with_lora_and_flora_slots(n_tokens):
    """Slots 0 and 2 LoRA (ranks 4, 3), slot 1 FLoRA (rank 2), base rows; biases on every layer. Column
    shards concatenated, row shards' partial sums plus the bias once, and the vocab shards of
    lm_head concatenated equal the unsharded layers (float32)."""
    whole = random_llama(ARGS, torch.float32)
    bank = AdapterBank(whole, n_slots=3, r_max=8)
    lora, flora = random_factors(bank.shapes(), 4, seed=1), random_factors(bank.shapes(), 2, seed=2, flora=True)
    lora3 = random_factors(bank.shapes(), 3, seed=4)
    ids = [(-1, 0, 1, 2)[i % 4] for i in range(n_tokens)]
    shards, banks = [], []
    for rank in range(2):
        m = shard_llama(copy.deepcopy(whole), TensorParallel(rank, 2))
        b = AdapterBank(m, n_slots=3, r_max=8)
        assert b.shapes() == bank.shapes()  # adapter files are checked against the whole layer
        shards.append(dict(m.named_modules()))
        banks.append(b)
    for b in [bank, *banks]:
        b.write(0, lora)
        b.write(1, flora, multiplicative=True)
        b.write(2, lora3)
    x = torch.randn(n_tokens, 96, generator=torch.Generator().manual_seed(3))
    checked = 0
    for name, layer in whole.linear_layers().items():
        d_in = layer.d_in
        want = layer(x[:, :d_in], TokenSlots.build(ids, bank, "cpu"))
        parts = [(s[name], TokenSlots.build(ids, b, "cpu")) for s, b in zip(shards, banks)]
        if isinstance(parts[0][0], RowParallelLinear):
            xs = x[:, :d_in].chunk(2, dim=1)  # the column-parallel layer before hands each rank its part
            bias = parts[0][0].out_bias  # down_proj's, added once after the all-reduce; o_proj has none
            assert parts[0][0].bias is None and (bias is not None) == name.endswith("down_proj")
            got = sum(BankedLinear.forward(p, xi, ts) for (p, ts), xi in zip(parts, xs)) + (0 if bias is None else bias)
        else:
            assert parts[0][0].weight.shape[0] == layer.d_out // 2
            got = torch.cat([p(x[:, :d_in], ts) for p, ts in parts], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        delta = want - layer(x[:, :d_in], TokenSlots.build([-1] * n_tokens, bank, "cpu"))
        assert all(delta[s::4].abs().min() > 0 for s in (1, 2, 3))  # every adapter changed its rows
        assert delta[0::4].abs().max() == 0
        checked += 1
    assert checked == 7
    h = x[:, :64]
    assert shards[1]["lm_head"].weight.shape == (46, 64)  # 91 rows padded to 92
    head = torch.cat([torch.nn.functional.linear(h, s["lm_head"].weight) for s in shards], dim=1)[:, :91]
    torch.testing.assert_close(head, whole.lm_head(h), rtol=1e-5, atol=1e-5)


def test_sizes_that_do_not_split_are_refused():
    check_divisible(ARGS, 2)
    with pytest.raises(ValueError, match=r"--tensor-parallel 3 does not divide .* 4 attention heads, 2 key/value"):
        check_divisible(ARGS, 3)
    with pytest.raises(ValueError, match=r"use one of \[1, 2\]"):
        check_divisible(ARGS, 4)
    with pytest.raises(ValueError, match="at least 1"):
        check_divisible(ARGS, 0)
    with pytest.raises(ValueError, match="does not divide"):
        shard_llama(random_llama(ARGS, torch.float32), TensorParallel(0, 4))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    tiny_llama_folder(root / "base")  # 4 heads, 2 KV heads, 128 MLP features, vocab 96: all split by 2
    adapters = {
        "sql": peft_adapter(root / "base", root / "sql", 4, ["q_proj", "v_proj", "o_proj"], seed=1),
        "py": peft_adapter(root / "base", root / "py", 8, "all-linear", seed=3),
        "f2": flora_adapter(root / "base", root / "f2", 2, "all-linear", seed=1),
        "spare": peft_adapter(root / "base", root / "spare", 2, ["v_proj"], seed=5),
    }
    peft_adapter(root / "base", root / "late", 2, ["gate_proj", "up_proj"], seed=6)  # registered at run time
    return root, {k: str(v) for k, v in adapters.items()}


GREEDY = {"max_tokens": 10, "temperature": 0.0}
REQUESTS = [  # (prompt, sampling, adapter, step it arrives at)
    (prompt(1, 18), GREEDY, "sql", 0),  # longer than a step (16 tokens): chunked
    (prompt(2, 5), GREEDY, None, 0),
    (prompt(3, 7), GREEDY, "py", 0),
    (prompt(4, 9), GREEDY, "f2", 0),
    (prompt(5, 6), GREEDY, "sql", 3),  # arrive mid-decode
    (prompt(6, 4), GREEDY, None, 3),
    (prompt(7, 8), {"max_tokens": 8, "temperature": 1.0, "seed": 11}, "py", 4),
    (prompt(8, 6), {"max_tokens": 8, "temperature": 1.0}, "f2", 1),  # no seed: the ranks must still agree
    (prompt(10, 6), GREEDY, "late", 2),  # registered at step 2
    (prompt(9, 6), {"max_tokens": 40, "temperature": 0.0}, "py", 0),  # aborted at step 5
]


def test_two_process_engine_equals_one_process_for_a_mixed_batch(setup, tmp_path):
    """Base rows, PEFT LoRA adapters (ranks 4 and 8, and one registered at run time) and a
    FLoRA one in the same steps, chunked prompts and arrivals mid-decode: rank 0's and rank 1's
    engines finish every request with the same tokens, and those of the seeded ones are the
    one-process engine's."""
    root, adapters = setup
    engine_kw = {"max_batch_tokens": 16, "max_gpu_adapters": 4, "max_lora_rank": 8}
    spec = {"model": str(root / "base"), "adapters": adapters, "engine": engine_kw, "requests": REQUESTS,
            "abort_at": 5, "abort": f"r{len(REQUESTS) - 1}", "runtime_at": 2,
            "register": ["late", str(root / "late")], "unregister": "spare"}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(HERE / "tp_worker.py"), str(tmp_path / "spec.json"), tmp_path]  # fmt: skip
    run = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # ranks that disagree wait on each other: end them all
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode == 0, stderr[-8000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["finished"] == ranks[1]["finished"]  # the same tokens and finish reasons on both ranks
    assert ranks[0]["shapes"]["steps"] == ranks[1]["shapes"]["steps"]
    for r in ranks:
        assert r["shapes"]["kv_heads"] == 1 and r["shapes"]["lm_head"] == [48, 64]  # half the KV heads, vocab
        assert r["shapes"]["adapters"] == ["f2", "late", "py", "sql"]  # registered at run time on every rank
    got = ranks[0]["finished"]

    one = lf.Engine(model=root / "base", adapters=adapters, device="cpu", **engine_kw)
    reqs = {}
    for step in range(200):
        if step == 2:
            one.registry.register("late", root / "late")
        for i, (text, sampling, adapter, arrive) in enumerate(REQUESTS):
            if arrive == step:
                reqs[f"r{i}"] = one.add_request(text, SamplingParams(**sampling), adapter, request_id=f"r{i}")
        if step == 5:
            one.abort(spec["abort"])
        if len(reqs) == len(REQUESTS) and all(r.finished for r in reqs.values()):
            break
        one.step()
    base = [one.add_request(text, SamplingParams(**GREEDY)) for text, *_ in REQUESTS[:4]]
    while one.has_work():
        one.step()
    for i, (_, sampling, adapter, _) in enumerate(REQUESTS):
        rid = f"r{i}"
        if rid == spec["abort"]:
            assert got[rid][1] == "abort" and 0 < len(got[rid][0]) < 40
        elif "seed" in sampling or sampling["temperature"] == 0:
            assert got[rid] == [reqs[rid].output_ids, reqs[rid].finish_reason], (rid, adapter)
        else:
            assert got[rid][1] in ("stop", "length") and got[rid][0]
    assert len({json.dumps(got[f"r{i}"]) for i in range(4)}) == 4
    assert all(got[f"r{i}"][0] != base[i].output_ids for i in (0, 2, 3))  # the adapters changed their tokens


def serve(root, *extra, **popen):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loraflow.cli", "serve", "--model", str(root / "base"), "--port", str(port),
           "--max-batch-tokens", "32", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LORAFLOW_API_KEY", None)
    return port, subprocess.Popen(cmd, env=env, text=True, **popen)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def is_worker(pid: int) -> bool:
    try:
        return "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:  # exited
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_serve_with_tensor_parallel_answers_like_one_process_and_its_workers_exit_with_it(setup, tmp_path):
    """``loraflow serve --tensor-parallel 2``: the completions (an adapter's, one loaded at run
    time through the API, the base model's) are the one-process engine's, and SIGTERM ends the
    server and its worker process."""
    root, adapters = setup
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    port, proc = serve(root, "--lora", f"py={adapters['py']}", "--tensor-parallel", "2", "--adapter-dir", runtime,
                       "--allow-runtime-lora", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        line = proc.stdout.readline()
        assert line.rstrip().endswith("(cpu, 1 thread, tensor parallel over 2 processes)"), line
        workers = [p for p in children(proc.pid) if is_worker(p)]
        assert len(workers) == 1
        shutil.copytree(root / "late", runtime / "late")
        loaded = httpx.post(url + "/load_lora_adapter", json={"lora_name": "late", "lora_path": str(runtime / "late")})
        assert loaded.status_code == 200, loaded.text
        got = {}
        for model in ("py", "late", "base"):
            body = {"model": model, "prompt": prompt(40, 7), "max_tokens": 8, "temperature": 0}
            answer = httpx.post(url + "/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            got[model] = answer.json()["choices"][0]["text"]
        assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "py"}).status_code == 200
        after = {"model": "py", "prompt": prompt(40, 7), "max_tokens": 8}
        assert httpx.post(url + "/completions", json=after, timeout=60).status_code == 404
        body = {"model": "late", "prompt": prompt(41, 5), "max_tokens": 8, "temperature": 0}
        again = httpx.post(url + "/completions", json=body, timeout=60)  # the ranks still agree
        assert again.status_code == 200, again.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stdout.read()
    assert not is_worker(workers[0])  # gone with the server
    one = lf.Engine(model=root / "base", adapters={"py": adapters["py"], "late": root / "late"}, device="cpu",
                    max_batch_tokens=32)  # fmt: skip
    want = one.generate([prompt(40, 7)] * 3, ["py", "late", None], max_tokens=8, temperature=0.0)
    assert [got["py"], got["late"], got["base"]] == want and len(set(want)) == 3
    assert again.json()["choices"][0]["text"] == one.generate([prompt(41, 5)], ["late"], max_tokens=8, temperature=0)[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_dead_worker_fails_the_requests_and_stops_the_server(setup):
    """A worker killed (-9): the next request answers 503 at once, and the server exits
    non-zero, saying why, for a supervisor to restart it."""
    root, _ = setup
    port, proc = serve(root, "--tensor-parallel", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "tensor parallel over 2 processes" in proc.stdout.readline()
        (worker,) = [p for p in children(proc.pid) if is_worker(p)]
        os.kill(worker, signal.SIGKILL)
        body = {"model": "base", "prompt": prompt(1, 4), "max_tokens": 4}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 503 and "tensor-parallel step failed" in answer.json()["error"]["message"]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "loraflow serve: a tensor-parallel step failed" in err, err[-3000:]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tensor-parallel", "3"], "--tensor-parallel 3 does not divide this model's 4 attention heads, 2 key/value"),
        (["--tensor-parallel", "0"], "--tensor-parallel must be at least 1, got 0"),
    ],
    ids=["heads", "below-one"],
)
def test_serve_refuses_a_tensor_parallel_size_it_cannot_serve(setup, extra, message, capsys, monkeypatch):
    """``loraflow serve`` in this process (a second process costs 3 s of imports): it exits
    naming the problem, before it starts a worker or serves."""
    from loraflow.cli import main
    from loraflow.serve import command, tp_launch

    root, _ = setup
    monkeypatch.setattr(tp_launch, "start", lambda *a: pytest.fail("it started the workers"))
    monkeypatch.delenv("LORAFLOW_API_KEY", raising=False)
    bound, real = [], command.bind_socket

    def bind(*a):
        bound.append(real(*a))
        return bound[-1]

    monkeypatch.setattr(command, "bind_socket", bind)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(root / "base"), "--port", "0", "--max-batch-tokens", "32", *extra])
    for sock in bound:  # the port it took before the model loaded
        sock.close()
    assert exit_.value.code != 0 and message in str(exit_.value.code), exit_.value.code
    assert "serving" not in capsys.readouterr().out


def test_more_ranks_than_gpus_is_refused():
    from loraflow.serve.tp_launch import check_tensor_parallel

    check_tensor_parallel(2, ARGS, "cuda", gpus=2)
    check_tensor_parallel(2, ARGS, "cpu", gpus=0)  # CPU ranks share the cores
    with pytest.raises(ValueError, match=r"--tensor-parallel 2 needs 2 GPUs, one a rank, but 1 are visible"):
        check_tensor_parallel(2, ARGS, "cuda", gpus=1)


@pytest.mark.parametrize("tp", [TensorParallel(0, 2), None], ids=["tensor-parallel", "one-process"])
def test_an_idle_rank_0_steps_now_and_then_for_the_workers_waiting_on_it(monkeypatch, tp):
    """The workers wait for each step's broadcast; an idle rank 0 steps every HEARTBEAT_S so
    that the wait never reaches the process group's timeout (one process: no idle steps)."""
    from loraflow.serve import loop

    monkeypatch.setattr(loop, "HEARTBEAT_S", 0.05)
    steps = []
    engine = SimpleNamespace(
        tp=tp, has_work=lambda: False, in_flight=False, failures_in_a_row=0, step=lambda: steps.append(1) or []
    )
    looping = loop.EngineLoop(engine)
    time.sleep(0.6)
    looping.stop()
    looping._thread.join(timeout=5)
    assert (4 <= len(steps) <= 12) if tp else not steps, len(steps)
