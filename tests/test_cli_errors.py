"""The CLI's failures read as one line, not a traceback; a closed pipe ends it quietly; --help
shows defaults."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make

import loraflow as lf
from loraflow.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "adapters" / "shakespeare"


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "loraflow.cli", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_inspect_missing_folder_is_one_line_and_non_zero(tmp_path):
    out = cli("inspect", str(tmp_path / "nonexistent"))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == f"loraflow inspect: adapter folder {tmp_path / 'nonexistent'} does not exist"
    assert "Traceback" not in out.stderr


@pytest.fixture
def adapter(tmp_path):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, target_modules=["q_proj"]), name="a")
    return lf.save_adapter(model, tmp_path / "a")


def inspect_error(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(path)])
    assert capsys.readouterr().out == ""
    return str(exit_.value.code)


def test_inspect_bad_folders_name_the_problem(adapter, capsys):
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    weights.rename(adapter / "moved")
    assert inspect_error(adapter, capsys) == f"loraflow inspect: {weights} is missing"
    (adapter / "moved").rename(weights)
    weights.write_bytes(weights.read_bytes()[:100])
    assert "is not a readable safetensors file" in inspect_error(adapter, capsys)
    config.write_text("{not json")
    assert f"{config} is not valid JSON" in inspect_error(adapter, capsys)
    config.unlink()
    assert inspect_error(adapter, capsys) == f"loraflow inspect: {config} is missing: not an adapter folder"


def test_closed_pipe_ends_quietly():
    """``loraflow inspect ... | head -0``: the reader is gone before the output is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraflow.cli", "inspect", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_inspect_into_head():
    out = subprocess.run(
        f"{sys.executable} -m loraflow.cli inspect {EXAMPLE} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.startswith("LoRAConfig(")
    assert "Traceback" not in out.stderr and "Error" not in out.stderr


@pytest.mark.parametrize(
    "command, shown",
    [
        (
            ["serve"],
            [
                "--port PORT           the TCP port to listen on: 1..65535, or 0 for any free one (default: 8000)",
                "(default: 127.0.0.1)",
            ],
        ),
        (["bench", "serve"], ["(default: 64)", "(default: distinct)"]),
        (["bench", "train"], ["(default: 60m,130m,350m,1b,7b)", "(default: gram)"]),
        (["bench", "kernels"], ["(default: benchmarks/results)"]),
    ],
)
def test_help_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for s in shown:
        assert " ".join(s.split()) in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    "error,code,words",
    [
        (KeyboardInterrupt(), 130, "--resume continues"),
        (ValueError("/x already holds a checkpoint"), None, "already holds"),
    ],
)
def test_pretrain_interrupted_or_refused_ends_in_one_line(monkeypatch, capsys, error, code, words):
    import loraflow.train.pretrain as pretrain

    def stop(argv):
        raise error

    monkeypatch.setattr(pretrain, "main", stop)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", "x", "--out", "y"])
    message = e.value.code if code is None else capsys.readouterr().err
    assert (code is None or e.value.code == code) and words in message and message.startswith(("loraflow", "\n"))
