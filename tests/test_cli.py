from conftest import make

import loraflow as lf
from loraflow.cli import main


def test_inspect_prints_config_and_shapes(tmp_path, capsys):
    model = make("llama")
    lf.add_adapter(model, lf.LoRAConfig(r=4, target_modules=["q_proj"]), name="a")
    lf.save_adapter(model, tmp_path / "a")
    main(["inspect", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "LoRAConfig(r=4" in out
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight  (32, 4)" in out


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == lf.__version__
