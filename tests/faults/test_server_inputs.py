"""Hostile and unusual client inputs: each fails its own request with a JSON error naming the
cause (or is served correctly), and the server goes on serving."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from helpers import LiveServer, peft_adapter, prompt, reference, tiny_llama_folder
from safetensors.torch import load_file, save_file

import loraflow as lf

VOCAB = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny_llama_folder(root / "base")
    (root / "dir").mkdir()
    (root / "broken").mkdir()
    sql = peft_adapter(root / "base", root / "dir" / "sql", 4, ["q_proj", "v_proj"], seed=1)
    for name, edit in [
        ("nan", lambda t: t.fill_(float("nan"))),  # NaN in the file
        ("boom", lambda t: t.fill_(3e38)),  # finite in the file, inf once used: refused by the loader's bound
    ]:
        folder = peft_adapter(
            root / "base", root / ("dir" if name == "boom" else "broken") / name, 2, ["down_proj"], seed=7
        )
        weights = load_file(folder / "adapter_model.safetensors")
        for key, t in weights.items():
            if "lora_B" in key:
                edit(t)
        save_file(weights, folder / "adapter_model.safetensors")
    for name in ("truncated", "no_b", "no_r", "linked"):
        peft_adapter(root / "base", root / "broken" / name, 2, ["q_proj"], seed=8)
    weights = root / "broken" / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    weights = root / "broken" / "no_b" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "lora_B" not in k or ".0." not in k}, weights)
    config = root / "broken" / "no_r" / "adapter_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "r"}))
    return root, sql


@pytest.fixture(scope="module")
def server(files):
    root, _ = files
    engine = lf.Engine(model=root / "base", adapter_dir=root / "dir", device="cpu", max_batch_tokens=64)
    s = LiveServer(engine, adapter_dir=str(root), allow_runtime_lora=True, max_body_bytes=256 * 1024, body_timeout=1.0)
    yield s
    s.close()


def post(server, route, body, **kw):
    return httpx.post(server.url + route, json=body, timeout=kw.pop("timeout", 60), **kw)


def complete(server, **body):
    return post(server, "/v1/completions", {"model": "base", "max_tokens": 4, **body})


def error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["error"]


def test_token_ids_outside_the_vocabulary_fail_the_request_not_the_server(server):
    for ids in ([-1], [VOCAB], [10**9], [5, 6, VOCAB + 1]):
        message = error(complete(server, prompt=ids), 400)["message"]
        assert "vocabulary" in message and f"[0, {VOCAB})" in message
    assert complete(server, prompt=[5, 6, 7]).status_code == 200


def test_a_vanishing_temperature_is_greedy(server):
    p = prompt(1, 6)
    tiny = complete(server, prompt=p, temperature=1e-40, max_tokens=6)
    zero = complete(server, prompt=p, temperature=0, max_tokens=6)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == zero.json()["choices"][0]["text"]


def test_an_adapter_with_nan_weights_is_refused_at_load_with_the_layer_named(server, files):
    root, _ = files
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "nan", "lora_path": str(root / "broken" / "nan")})
    message = error(r, 400)["message"]
    assert "non-finite" in message and "down_proj" in message
    assert error(complete(server, model="nan", prompt="w1"), 404)["code"] == "model_not_found"


def requests_of(server, models):
    """Concurrent completions, one per (model, temperature, logprobs) of ``models``."""

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
            return await asyncio.gather(
                *[
                    h.post(
                        "/v1/completions",
                        json={"model": m, "prompt": prompt(2, 5), "max_tokens": 3, "temperature": t, "logprobs": lp},
                    )
                    for m, t, lp in models
                ]
            )

    return asyncio.run(run())


def test_an_adapter_with_garbage_weights_fails_only_its_own_requests(server):
    """Weights of 3e38, finite in the file: beyond the loader's |w| bound, a 400 naming it."""
    *boom, sql, base = requests_of(
        server, [("boom", 1.0, None), ("boom", 0.0, None), ("boom", 0.0, 2), ("sql", 1.0, None), ("base", 0.0, None)]
    )
    for r in boom:
        message = error(r, 400)["message"]
        assert "adapter 'boom'" in message and "beyond the |w| <= 10000" in message and "down_proj" in message
    assert sql.status_code == 200 and base.status_code == 200
    assert server.loop.engine.registry.pins["boom"] == 0


def test_an_adapter_whose_output_overflows_fails_only_its_own_requests(server, files, monkeypatch):
    """Factors that pass the loader's checks but overflow once used (here scaled after the
    load): the engine's guard fails the requests that use them, with a 500."""
    from loraflow.serve import registry

    real = registry.factors_for_bank

    def overflowing(path, shapes, r_max, name=None):
        factors = real(path, shapes, r_max, name)
        if name == "overflow":
            for module, (a, b) in factors.items():
                factors[module] = (a, b * 3e38)
        return factors

    monkeypatch.setattr(registry, "factors_for_bank", overflowing)
    root, _ = files
    server.loop.engine.registry.register("overflow", root / "dir" / "sql")
    *boom, sql, base = requests_of(
        server,
        [
            ("overflow", 1.0, None),
            ("overflow", 0.0, None),
            ("overflow", 0.0, 2),
            ("sql", 1.0, None),
            ("base", 0.0, None),
        ],
    )
    for r in boom:
        assert "non-finite logits" in error(r, 500)["message"]
    assert sql.status_code == 200 and base.status_code == 200
    assert server.loop.engine.registry.pins["overflow"] == 0
    server.loop.engine.registry.unregister("overflow")


@pytest.mark.parametrize("name,words", [("truncated", "truncated"), ("no_b", "lora_B"), ("no_r", "'r'")])
def test_broken_adapter_files_answer_400_in_json(server, files, name, words):
    root, _ = files
    r = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(root / "broken" / name)})
    assert words in error(r, 400)["message"]


def test_a_weights_file_linked_outside_the_adapter_folder_is_refused(server, files, tmp_path):
    root, sql = files
    linked = root / "broken" / "linked" / "adapter_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((sql / "adapter_model.safetensors").read_bytes())
    linked.unlink()
    linked.symlink_to(outside)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "linked", "lora_path": str(linked.parent)})
    assert "outside" in error(r, 403)["message"]


def test_prompts_that_are_empty_or_not_unicode_answer_400(server):
    empty = error(complete(server, prompt=""), 400)
    assert "empty" in empty["message"] and empty["code"] == "invalid_prompt"
    body = '{"model": "base", "prompt": "w1 \\ud800 w2", "max_tokens": 2}'
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert "Unicode" in error(r, 400)["message"]
    body = '{"model": "base", "messages": [{"role": "user", "content": "w1 \\udfff"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "Unicode" in error(r, 400)["message"]


def test_max_tokens_above_the_context_answers_400(server):
    room = server.loop.engine.max_len
    err = error(complete(server, prompt=prompt(3, 4), max_tokens=room), 400)
    assert err["code"] == "context_length_exceeded" and f"at most {room - 4}" in err["message"]
    near = complete(server, prompt=prompt(3, room - 3), max_tokens=None)  # the default 16 shrinks to what fits
    assert near.status_code == 200 and near.json()["usage"]["completion_tokens"] <= 3


def test_unsupported_parameters_are_named_not_ignored(server):
    for field, value in [
        ("n", 2),
        ("tools", [{"type": "function"}]),
        ("logit_bias", {"5": 10}),
        ("best_of", 2),
        ("suffix", "x"),
    ]:
        err = error(complete(server, prompt="w1", **{field: value}), 400)
        assert err["param"] == field and repr(field) in err["message"]
    assert complete(server, prompt="w1", user="someone", logit_bias=None).status_code == 200
    err = error(complete(server, prompt="w1", echo=True, logprobs=1), 400)
    assert err["param"] == "echo"


def test_bodies_over_the_limit_get_413_with_or_without_a_length(server):
    big = {"model": "base", "prompt": "w1 " * 200_000}
    assert "--max-body-mb" in error(post(server, "/v1/completions", big), 413)["message"]

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    error(r, 413)
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_that_sends_half_a_request_and_stalls_gets_408_and_stalls_nobody(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"model": "base",'
        )
        started = time.perf_counter()
        assert complete(server, prompt="w1 w2").status_code == 200  # others are served meanwhile
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer
    assert time.perf_counter() - started < 5


def test_tokenizing_runs_off_the_event_loop(server, monkeypatch):
    """A slow tokenization (a large prompt) leaves /health and other routes answering."""
    engine = server.loop.engine
    slow = engine.tokenize

    def tokenize(text):
        time.sleep(2.0)
        return slow(text)

    monkeypatch.setattr(engine, "tokenize", tokenize)
    thread = threading.Thread(target=lambda: complete(server, prompt="w1 w2"))
    thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - started < 1.0
    thread.join()


def hf_logprobs(folder, adapter, text, n):
    """Greedy continuation's per-token log-probabilities under transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), adapter).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            token = int(lp.argmax())
            out.append((token, float(lp[token]), torch.topk(lp, 3)))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def test_logprobs_equal_transformers_and_peft(server, files):
    root, sql = files
    p = prompt(4, 6)
    ref = hf_logprobs(root / "base", sql, p, 4)
    r = complete(server, model="sql", prompt=p, temperature=0, logprobs=3, ignore_eos=True)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 4 and len(lp["text_offset"]) == 4
    for got, top, (_, want, want_top) in zip(lp["token_logprobs"], lp["top_logprobs"], ref):
        assert abs(got - want) < 1e-4
        assert sorted(top.values(), reverse=True) == pytest.approx(want_top.values.tolist(), abs=1e-4)
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "model": "sql",
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6 for c in content)
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={
            "model": "sql",
            "prompt": p,
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": 1,
            "stream": True,
            "ignore_eos": True,
        },
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [x for e in events for x in (e["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)


def greedy_with(folder, text, n, penalty):
    """A reference greedy loop over transformers' logits with a penalty function of (logits, prompt, output)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].double()
            out.append(int(penalty(logits, ids, out).argmax()))
    return out


def test_penalties_equal_a_reference_loop(server, files):
    root, _ = files
    p = prompt(5, 5)

    def repetition(logits, ids, out):
        seen = torch.tensor(sorted(set(ids + out)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
        return logits

    def frequency_presence(logits, ids, out):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        return logits - 0.7 * counts - 1.1 * (counts > 0).double()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "base")
    for fields, penalty in [
        ({"repetition_penalty": 1.8}, repetition),
        ({"frequency_penalty": 0.7, "presence_penalty": 1.1}, frequency_presence),
    ]:
        want = greedy_with(root / "base", p, 8, penalty)
        r = complete(server, prompt=p, temperature=0, max_tokens=8, ignore_eos=True, **fields)
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), fields
    plain = complete(server, prompt=p, temperature=0, max_tokens=8, ignore_eos=True).json()["choices"][0]["text"]
    assert plain != tok.decode(greedy_with(root / "base", p, 8, repetition), skip_special_tokens=True)


def test_echo_prepends_the_prompt(server):
    p = prompt(6, 4)
    plain = complete(server, prompt=p, temperature=0).json()["choices"][0]["text"]
    assert complete(server, prompt=p, temperature=0, echo=True).json()["choices"][0]["text"] == p + plain


def test_the_server_still_answers_after_all_of_the_above(server, files):
    root, sql = files
    p = prompt(9, 5)
    r = complete(server, model="sql", prompt=p, temperature=0, max_tokens=5)
    assert r.status_code == 200
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "base")
    assert r.json()["choices"][0]["text"] == tok.decode(reference(root / "base", sql, p, 5), skip_special_tokens=True)
    engine = server.loop.engine
    assert not engine.running and engine.kv.used_blocks == 0 and not any(engine.registry.pins.values())
