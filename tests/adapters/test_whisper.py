"""An encoder-decoder speech model goes through the same adapter code as the text models."""

import torch
from conftest import randomize, rel_err
from peft import PeftModel
from transformers import WhisperConfig, WhisperForConditionalGeneration

import loraflow as lf


def tiny_whisper(seed=0):
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(cfg).eval()


def run(model):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 32, generator=g)
    decoder_ids = torch.randint(0, 128, (2, 5), generator=g)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=decoder_ids).logits


def test_whisper_all_linear_merge_and_peft(tmp_path):
    model = tiny_whisper()
    base = run(model)
    lf.add_adapter(model, lf.LoRAConfig(r=4, alpha=8, target_modules="all-linear"), name="a")
    names = [n for n, _ in lf.adapter_layers(model, "a")]
    assert "proj_out" not in names and any(".encoder." in n for n in names) and any(".decoder." in n for n in names)
    torch.testing.assert_close(run(model), base, rtol=0, atol=0)
    randomize(model, "a")
    adapted = run(model)
    assert rel_err(adapted, base) > 1e-3
    lf.merge_adapter(model, "a")
    assert rel_err(run(model), adapted) < 1e-5
    lf.unmerge_adapter(model, "a")
    lf.save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_whisper(), tmp_path / "a").eval()
    assert rel_err(run(peft_model), adapted) < 1e-5
