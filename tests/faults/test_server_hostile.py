"""Requests built to break the server (issue 23): out-of-range fields, bodies that are not JSON,
unknown routes, connections that stall, and what the answers tell about the server's files.
Every one gets a 4xx in OpenAI's error envelope, never a 500 or an answer that names a server path."""

import json
import socket
import threading
import time

import httpx
import pytest
from helpers import LiveServer, peft_adapter, tiny_llama_folder

import loraflow as lf


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tiny_llama_folder(root / "base")
    (root / "dir").mkdir()
    peft_adapter(root / "base", root / "dir" / "sql", 2, ["q_proj"], seed=1)
    peft_adapter(root / "base", root / "dir" / "trunc", 2, ["q_proj"], seed=2)
    weights = root / "dir" / "trunc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    peft_adapter(root / "base", root / "elsewhere" / "ext", 2, ["v_proj"], seed=3)
    return root


@pytest.fixture(scope="module")
def server(root):
    engine = lf.Engine(
        model=root / "base",
        adapter_dir=root / "dir",
        adapters={"ext": str(root / "elsewhere" / "ext")},
        device="cpu",
        max_batch_tokens=64,
    )
    s = LiveServer(engine, adapter_dir=str(root / "dir"), allow_runtime_lora=True, body_timeout=1.0, header_timeout=1.0)
    yield s
    s.close()


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def complete(server, **body):
    return httpx.post(server.url + "/v1/completions", json={"model": "base", "max_tokens": 2, **body}, timeout=60)


def load(server, name, path):
    return httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)


def test_a_seed_beyond_64_bits_answers_400_naming_the_range(server):
    for seed in (2**64, -(2**63) - 1, 10**30):
        err = error(complete(server, prompt="w1 w2", seed=seed), 400)
        assert err["param"] == "seed" and "seed" in err["message"], err
        assert str(2**64 - 1) in err["message"] or str(-(2**63)) in err["message"], err
    for seed in (2**64 - 1, -(2**63), -1, 0):
        assert complete(server, prompt="w1 w2", seed=seed).status_code == 200


def test_lora_paths_with_a_nul_or_too_long_answer_400_without_server_paths(server, root):
    cases = [
        (str(root / "dir" / "sql") + "\x00x", "NUL"),
        ("a" * 5000, "4096"),
        ("a" * 300, "cannot be opened"),  # one part longer than the file system allows
        ("", "at least 1"),
    ]
    for path, words in cases:
        r = load(server, "late", path)
        err = error(r, 400)
        assert err["param"] == "lora_path" and words in err["message"], err
        assert str(root) not in r.text
    r = load(server, "late", str(root / "elsewhere" / "ext"))
    assert "outside" in error(r, 403)["message"] and str(root) not in r.text
    r = load(server, "x" * 129, "sql")
    assert error(r, 400)["param"] == "lora_name"


def test_a_relative_lora_path_is_under_the_adapter_dir(server):
    assert load(server, "again", "sql").status_code == 200
    assert complete(server, model="again", prompt="w1").status_code == 200
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200


def test_models_and_adapter_errors_name_no_server_path(server, root):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200 and str(root) not in r.text
    roots = {m["id"]: m["root"] for m in r.json()["data"]}
    assert roots["sql"] == "sql" and roots["ext"] == "ext" and roots["base"] == "base"
    r = complete(server, model="trunc", prompt="w1")  # found by the scan, fails when first used
    assert "trunc" in error(r, 400)["message"] and str(root) not in r.text
    r = load(server, "trunc2", str(root / "dir" / "trunc"))
    assert "trunc" in error(r, 400)["message"] and str(root) not in r.text


def test_an_internal_error_answers_500_without_its_text(server, monkeypatch):
    def broken(text):
        raise RuntimeError("/srv/secret/path went wrong")

    monkeypatch.setattr(server.loop.engine, "tokenize", broken)
    r = complete(server, prompt="w1")
    err = error(r, 500)
    assert "RuntimeError" in err["message"] and "/srv" not in r.text and err["type"] == "server_error"


def raw(server, content: bytes) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})


def test_bodies_that_are_not_json_answer_400_in_the_envelope(server):
    assert "UTF-8" in error(raw(server, b'{"model": "base", "prompt": "\xff\xfe"}'), 400)["message"]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in error(raw(server, deep), 400)["message"]
    assert "not valid JSON" in error(raw(server, b'{"model": '), 400)["message"]
    assert error(raw(server, b"[1, 2]"), 400)["message"]
    assert complete(server, prompt="w1").status_code == 200


def test_unknown_routes_and_methods_answer_in_the_envelope(server):
    err = error(httpx.get(server.url + "/v2/nothing"), 404)
    assert "/v2/nothing" in err["message"] and "/v1/completions" in err["message"]
    r = httpx.get(server.url + "/v1/completions")
    assert "POST" in error(r, 405)["message"] and r.headers["allow"] == "POST"
    error(httpx.post(server.url + "/health"), 405)
    error(httpx.delete(server.url + "/v1/models"), 405)


def answer(sock: socket.socket, limit: float) -> tuple[str, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.perf_counter()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.decode(errors="replace"), time.perf_counter() - started


def test_headers_that_never_end_get_408_and_the_connection_closes(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        assert complete(server, prompt="w1").status_code == 200  # the others are served meanwhile
        text, took = answer(s, 10)
    assert text.startswith("HTTP/1.1 408") and "headers did not arrive within 1 s" in text, text
    assert took < 5
    with socket.create_connection((host, int(port))) as s:  # connected, then silent
        text, took = answer(s, 10)
    assert text.startswith("HTTP/1.1 408") and took < 5


def test_oversized_or_malformed_headers_answer_400_in_the_envelope(server):
    host, port = server.url.removeprefix("http://").split(":")
    for request in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000,  # headers past 16 KiB, unfinished
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(request)
            text, _ = answer(s, 10)
        head, _, body = text.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 400") and "application/json" in head, text
        assert "not valid HTTP/1.1" in json.loads(body)["error"]["message"]


def test_a_body_dripped_a_byte_at_a_time_meets_a_total_deadline(server):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "base", "prompt": "w1 w2 w3", "max_tokens": 2}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        stop = threading.Event()

        def drip():  # one byte every 0.2 s: never a pause as long as the 1 s deadline
            for byte in body:
                if stop.wait(0.2):
                    return
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            text, took = answer(s, 10)
        finally:
            stop.set()
            dripper.join()
    assert text.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in text, text
    assert took < 3


def test_the_server_still_serves_after_all_of_the_above(server):
    r = complete(server, model="sql", prompt="w1 w2", temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    engine = server.loop.engine
    assert not engine.running and engine.kv.used_blocks == 0


def test_scrub_paths_keeps_what_is_under_the_adapter_dir_and_the_last_part_of_the_rest():
    from loraflow.serve.errors import scrub_paths

    message = "/srv/ad/x/adapter_model.safetensors is truncated; see /opt/models/base/config.json (3/4 read)"
    assert scrub_paths(message, "/srv/ad") == "x/adapter_model.safetensors is truncated; see config.json (3/4 read)"
    assert scrub_paths("adapter 'sql' ranks 8 above --max-lora-rank 4", "/srv/ad").endswith("--max-lora-rank 4")
    assert scrub_paths("a text/plain body and a 1/2 chance") == "a text/plain body and a 1/2 chance"
