"""FLoRA adapters served: the engine's greedy output, FLoRA rows mixed with LoRA and base rows
in one batch, equals transformers with loraflow's FLoRA layer, request by request."""

import shutil

import pytest
import torch
from helpers import peft_adapter, prompt, tiny_llama_folder
from transformers import LlamaForCausalLM

import loraflow as lf
from loraflow.serve.registry import factors_for_bank
from loraflow.serve.sampling import SamplingParams


def flora_adapter(model_folder, out, r, targets, seed):
    """A FLoRA adapter far from the identity (A, B with noise), saved in PEFT's layout."""
    model = LlamaForCausalLM.from_pretrained(model_folder)
    lf.add_adapter(model, lf.FLoRAConfig(r=r, target_modules=targets), name="f")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lf.adapter_layers(model, "f"):
            a = layer.adapters["f"]
            a.A.add_(0.3 * torch.randn(a.A.shape, generator=g))
            a.B.add_(0.3 * torch.randn(a.B.shape, generator=g))
    lf.save_adapter(model, out, name="f")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flora-serve")
    tiny_llama_folder(root / "base")
    adapters = {
        "f1": flora_adapter(root / "base", root / "f1", 1, "all-linear", seed=1),
        "f4": flora_adapter(root / "base", root / "f4", 4, ["q_proj", "v_proj", "down_proj"], seed=2),
        "lora": peft_adapter(root / "base", root / "lora", 4, ["q_proj", "v_proj"], seed=3),
    }
    return root, adapters


def reference(root, adapter_path, text, max_tokens, merged=True):
    """transformers greedy ids with the adapter loaded by loraflow and, by default, merged into
    the weights (FLoRA: W0 ∘ BA/r; the engine never merges), or none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "base")
    model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    if adapter_path is not None:
        lf.load_adapter(model, adapter_path, name="a")
        if merged:
            lf.merge_adapter(model, "a")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, eos_token_id=1, pad_token_id=2)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(1)] if 1 in new else new


PAGED = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton interpreter")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and Triton kernels need a GPU")


@pytest.mark.parametrize(
    "slots,rank,graphs,device",
    [(8, 64, False, "cpu"), (4, 8, False, "cpu"), pytest.param(8, 64, True, "cpu", marks=PAGED),
     pytest.param(8, 16, True, "cuda", marks=CUDA)],
)  # fmt: skip
def test_flora_lora_and_base_rows_in_one_batch_equal_transformers(setup, slots, rank, graphs, device):
    """Gathered bank rows (8 x 64), the masked whole bank (4 x 8), and an engine with decode
    graphs, where the FLoRA rows' copies have fixed shapes (``RowCopies``): run eagerly on
    the CPU, captured on CUDA (float32 there, beside the same reference)."""
    root, adapters = setup
    eng = lf.Engine(model=root / "base", adapters={k: str(v) for k, v in adapters.items()}, device=device,
                    dtype=torch.float32, max_batch_tokens=64, max_gpu_adapters=slots, max_lora_rank=rank,
                    decode_graphs=graphs)  # fmt: skip
    names = ["f1", None, "lora", "f4", "f1", "f4"]
    prompts = [prompt(10 + i, 4 + 3 * i) for i in range(len(names))]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    reqs = [eng.add_request(p, params, a) for p, a in zip(prompts, names)]
    while not all(r.finished for r in reqs):
        eng.step()
    assert all(r.finish_reason != "error" for r in reqs), [r.error for r in reqs]
    for r, p, a in zip(reqs, prompts, names):
        assert r.output_ids == reference(root, adapters.get(a), p, 10), (a, p)
    flora_rows = [r.output_ids != reference(root, None, p, 10) for r, p, a in zip(reqs, prompts, names) if a]
    assert sum(flora_rows) >= 3  # the adapters change what the model says
    assert eng.bank.slot_flora.count(True) == 2 and eng.kv.used_blocks == 0
    if graphs:  # the decode steps with FLoRA rows ran through the graph path
        assert eng.stats["graph_steps"] >= 8 and eng.stats["decode_steps"] == 0


def test_flora_factors_for_the_bank(setup):
    root, adapters = setup
    model = LlamaForCausalLM.from_pretrained(root / "base")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes.pop("lm_head")
    factors = factors_for_bank(adapters["f4"], shapes, r_max=8)
    assert factors.multiplicative and not factors_for_bank(adapters["lora"], shapes, r_max=8).multiplicative
    lf.load_adapter(model, adapters["f4"], name="f")
    for name, (a, c) in factors.items():  # M = Σ_k c_k a_kᵀ = (1/r) B A, FLoRA's multiplier
        flora = model.get_submodule(name).adapters["f"]
        torch.testing.assert_close(c @ a, flora.multiplier())
    with pytest.raises(Exception, match="above the server's --max-lora-rank 2"):
        factors_for_bank(adapters["f4"], shapes, r_max=2)


def test_the_server_answers_a_flora_request_and_loads_one_at_run_time(setup, tmp_path):
    import shutil

    import httpx
    from helpers import LiveServer

    root, adapters = setup
    shutil.copytree(adapters["f4"], tmp_path / "f4")
    eng = lf.Engine(model=root / "base", adapters={"f1": str(adapters["f1"])}, device="cpu", max_batch_tokens=64)
    server = LiveServer(eng, adapter_dir=str(tmp_path), allow_runtime_lora=True)
    try:
        text = prompt(3, 6)
        load = httpx.post(
            server.url + "/v1/load_lora_adapter",
            json={"lora_name": "f4", "lora_path": str(tmp_path / "f4")},
            timeout=60,
        )
        assert load.status_code == 200, load.text
        for name, path in (("f1", adapters["f1"]), ("f4", adapters["f4"])):
            body = {"model": name, "prompt": text, "max_tokens": 6, "temperature": 0}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            expected = eng.tokenizer.decode(reference(root, path, text, 6))
            assert r.json()["choices"][0]["text"].strip() == expected.strip()
    finally:
        server.close()


@pytest.mark.parametrize("graphs", [False, pytest.param(True, marks=PAGED)])
def test_flora_on_layers_with_biases(tmp_path, graphs):
    """MLP biases: a FLoRA row is Σ_k c_k ∘ (W0 (a_k ∘ x)) + b, the bias added once (eagerly
    and in the decode graphs' fixed shapes)."""
    from helpers import VOCAB
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mlp_bias=True,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
    tiny_llama_folder(tmp_path / "tok")  # its tokenizer
    model.save_pretrained(tmp_path / "base")
    for f in (tmp_path / "tok").glob("*token*"):
        shutil.copy(f, tmp_path / "base" / f.name)
    flora_adapter(tmp_path / "base", tmp_path / "f", 2, "all-linear", seed=5)
    eng = lf.Engine(model=tmp_path / "base", adapters={"f": str(tmp_path / "f")}, device="cpu", max_batch_tokens=64,
                    decode_graphs=graphs)  # fmt: skip
    prompts = [prompt(40 + i, 5 + i) for i in range(3)]
    reqs = [
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0.0), a) for p, a in zip(prompts, ["f", None, "f"])
    ]
    while not all(r.finished for r in reqs):
        eng.step()
    root = tmp_path
    for r, p, a in zip(reqs, prompts, ["f", None, "f"]):
        assert r.output_ids == reference(root, tmp_path / "f" if a else None, p, 8), (a, p)
