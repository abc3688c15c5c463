"""Issue #13's probe, re-run by hand against a real ``loraflow serve`` on the embedded SmolLM2:
each hostile input, its HTTP status and the first words of its message, as a Markdown table.

    .venv/bin/python tests/faults/probe_live_server.py > probe.md

(Not a test: it starts servers on free local ports and takes about a minute; tests/faults
holds the same cases as tests on tiny models.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
rows: list[tuple[str, str, str]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(proc.stdout.read())


def record(case: str, r: httpx.Response | str, note: str = "") -> None:
    if isinstance(r, str):
        rows.append((case, "", r))
        return
    try:
        body = r.json()
        message = body["error"]["message"] if "error" in body else json.dumps(body)[:100]
    except ValueError:
        message = r.text
    rows.append((case, str(r.status_code), (note + " " if note else "") + message[:160].replace("|", "/")))


def broken_adapters(folder: Path) -> None:
    src = ROOT / "examples" / "adapters" / "shakespeare"
    for name in ("nan", "inf", "truncated", "no_b", "no_r", "linked"):
        shutil.copytree(src, folder / name)
    for name, value in (("nan", float("nan")), ("inf", 3e38)):
        w = load_file(folder / name / "adapter_model.safetensors")
        key = sorted(k for k in w if "lora_B" in k)[-1]  # the last layer's
        w[key].fill_(value)
        save_file(w, folder / name / "adapter_model.safetensors")
    f = folder / "truncated" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    f = folder / "no_b" / "adapter_model.safetensors"
    w = load_file(f)
    save_file({k: v for k, v in w.items() if not ("lora_B" in k and ".layers.0." in k)}, f)
    c = folder / "no_r" / "adapter_config.json"
    c.write_text(json.dumps({k: v for k, v in json.loads(c.read_text()).items() if k != "r"}))
    f = folder / "linked" / "adapter_model.safetensors"
    outside = folder.parent / "outside.safetensors"
    shutil.copy(f, outside)
    f.unlink()
    f.symlink_to(outside)


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    adapters = tmp / "adapters"
    shutil.copytree(ROOT / "examples" / "adapters", adapters)
    scanned = tmp / "scanned"
    scanned.mkdir()
    broken_adapters(tmp / "broken")
    shutil.copytree(tmp / "broken" / "nan", scanned / "nan_at_start")
    shutil.copytree(tmp / "broken" / "inf", adapters / "inf")
    proc, url = start(
        [
            "--adapter-dir",
            str(adapters),
            "--allow-runtime-lora",
            "--lora",
            f"nan_at_start={scanned / 'nan_at_start'}",
            "--max-body-mb",
            "4",
        ]
    )
    base = "SmolLM2-135M-Instruct"

    def post(route, body, **kw):
        return httpx.post(url + route, json=body, timeout=kw.pop("timeout", 120), **kw)

    def complete(**body):
        return post("/v1/completions", {"model": base, "prompt": "Hello", "max_tokens": 4, **body})

    try:
        for ids in ([-1], [49152], [10**9]):
            record(f"1. prompt {ids}", complete(prompt=ids))
        record("2. temperature 1e-40", complete(temperature=1e-40), "(greedy)")
        shutil.copytree(tmp / "broken" / "nan", adapters / "nan")
        record(
            "3. runtime load of NaN weights",
            post("/v1/load_lora_adapter", {"lora_name": "nan", "lora_path": str(adapters / "nan")}),
        )
        record(
            "3. request on an adapter whose output overflows (inf), temperature 1",
            complete(model="inf", temperature=1.0),
        )
        holder = {}
        t = threading.Thread(target=lambda: holder.setdefault("r", complete(model="python", max_tokens=8)))
        t.start()
        time.sleep(0.05)
        record(
            "4. unload 'python' while its request waits for it",
            post("/v1/unload_lora_adapter", {"lora_name": "python"}),
        )
        t.join()
        record("4. ... the waiting request", holder["r"])
        started = time.perf_counter()
        r = complete(model="nan_at_start")
        record(
            "5. request on an adapter that fails to load, idle server", r, f"({time.perf_counter() - started:.2f} s)"
        )
        try:
            complete(prompt="Once upon a time", max_tokens=4000, ignore_eos=True, timeout=1.0)
        except httpx.ReadTimeout:
            pass
        time.sleep(1.0)
        running = next(
            line
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("loraflow_requests_running")
        )
        record("6. non-streaming client leaves after 1 s (max_tokens 4000)", f"1 s later: {running}")
        record("6. max_tokens 10^30", complete(max_tokens=10**30))
        record(
            "8. register 'medical' again with shakespeare's files",
            post("/v1/load_lora_adapter", {"lora_name": "medical", "lora_path": str(adapters / "shakespeare")}),
        )
        record(
            "8. register the base model's name",
            post("/v1/load_lora_adapter", {"lora_name": base, "lora_path": str(adapters / "python")}),
        )
        started = time.perf_counter()
        big = {"model": base, "prompt": "a " * 25_000_000}
        r = httpx.post(url + "/v1/completions", json=big, timeout=120)
        record("9. 50 MB body", r, f"({time.perf_counter() - started:.2f} s)")
        for name in ("truncated", "no_b", "no_r"):
            shutil.copytree(tmp / "broken" / name, adapters / name)
            record(
                f"12. runtime load: {name}",
                post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters / name)}),
            )
        r = httpx.post(
            url + "/v1/completions",
            content='{"model": "' + base + '", "prompt": "a \\ud800"}',
            headers={"content-type": "application/json"},
        )
        record("12. lone surrogate in the prompt", r)
        record("12. empty prompt", complete(prompt=""))
        shutil.copytree(tmp / "broken" / "linked", adapters / "linked", symlinks=True)
        record(
            "13. weights file linked outside --adapter-dir",
            post("/v1/load_lora_adapter", {"lora_name": "l", "lora_path": str(adapters / "linked")}),
        )
        r = complete(logprobs=2, temperature=0)
        record(
            "16. logprobs 2",
            f"200: {len(r.json()['choices'][0]['logprobs']['token_logprobs'])} tokens with logprobs"
            if r.status_code == 200
            else r.text,
        )
        for field, value in (
            ("n", 2),
            ("frequency_penalty", 1.0),
            ("presence_penalty", 1.0),
            ("repetition_penalty", 1.3),
            ("echo", True),
            ("logit_bias", {"1": 5}),
            ("tools", []),
        ):
            record(f"16. {field}={value!r}", complete(**{field: value}))
        r = post(
            "/v1/chat/completions",
            {
                "model": base,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "logprobs": True,
                "top_logprobs": 2,
            },
        )
        record(
            "16. chat logprobs + top_logprobs 2",
            f"{r.status_code}: {len(r.json()['choices'][0]['logprobs']['content'])} tokens with logprobs"
            if r.status_code == 200
            else r.text,
        )
        record("health at the end", httpx.get(url + "/health"))
        port = url.rsplit(":", 1)[1]
        clash = subprocess.run(
            [sys.executable, "-m", "loraflow.cli", "serve", "--port", port], capture_output=True, text=True, timeout=120
        )
        record("15. second server on the same port", f"exit {clash.returncode}: {clash.stderr.strip()[-160:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    env = {**os.environ, "LORAFLOW_API_KEY": "s3cret"}
    proc, url = start(["--adapter-dir", str(adapters)], env=env)
    try:
        auth = {"Authorization": "Bearer s3cret"}
        record(
            "7. unload without --allow-runtime-lora",
            httpx.post(url + "/v1/unload_lora_adapter", headers=auth, json={"lora_name": "shakespeare"}),
        )
        record("13. wrong API key", httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}))
        record("13. key from LORAFLOW_API_KEY", httpx.get(url + "/v1/models", headers=auth), "(200 expected)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    inspect = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "inspect", "/no/such/folder"], capture_output=True, text=True
    )
    record("17. loraflow inspect /no/such/folder", f"exit {inspect.returncode}: {inspect.stderr.strip()}")
    print("| case | status | message |\n|---|---|---|")
    for case, status, message in rows:
        print(f"| {case} | {status} | {message} |")


if __name__ == "__main__":
    main()
