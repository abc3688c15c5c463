"""A tiny random Llama saved as a Hugging Face folder with a tokenizer, and PEFT adapters for it."""

from __future__ import annotations

import threading
import time

import torch
import uvicorn
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraflow.serve.api import create_app
from loraflow.serve.loop import EngineLoop

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_llama_folder(folder, seed=0, qwen=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits: greedy choices far from ties
        model.lm_head.weight.mul_(8)
    model.save_pretrained(folder)
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)
    return model


def wide_llama_folder(folder):
    """A Llama of the tiny one's vocabulary but half its width: another base model, whose
    adapters do not fit ``tiny_llama_folder``'s layers."""
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)


def peft_adapter(model_folder, out, r, targets, seed, alpha=None):
    """A PEFT LoRA adapter with random (non-zero) weights, saved to ``out``."""
    base = LlamaForCausalLM.from_pretrained(model_folder)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(4)
    peft_model.save_pretrained(out)
    return out


def reference(model_folder, adapter_path, text, max_tokens):
    """transformers (+ PEFT) greedy token ids for one prompt, without the end-of-sequence token."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder)
    model = LlamaForCausalLM.from_pretrained(model_folder).eval()
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path).eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=2,
        )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(1)] if 1 in new else new


def prompt(seed, n):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


class LiveServer:
    """``create_app`` served by uvicorn on a free local port as ``loraflow serve`` serves it
    (``server_config``), the engine on a background thread."""

    def __init__(self, engine, header_timeout: float = 10.0, **app_kw):
        from loraflow.serve.http import server_config

        self.loop = EngineLoop(engine)
        app = create_app(self.loop, **app_kw)
        self.server = uvicorn.Server(server_config(app, port=0, header_timeout=header_timeout, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):  # in the order ``loraflow serve`` stops
        self.server.should_exit = True
        self.loop.close()
        self.thread.join(timeout=5)
