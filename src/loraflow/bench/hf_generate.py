"""``loraflow bench serve --hf-baseline``: Hugging Face transformers' ``generate`` on the same
model and workload, without adapters, for issue 24's target (our server with 64 distinct
adapters at >= 1.5x the output tok/s of transformers' compiled static-cache ``generate``).

The model is the benchmark's own: the default model from its folder, or the same random
weights the server drew (``random_llama``, seed 0) copied into a ``LlamaForCausalLM`` of the
same shape (bf16 on CUDA, float32 on the CPU, as the server). The prompts are the server's
(``serve.prompts``). ``generate`` has no continuous batching, so all ``requests`` prompts
(one length) go in one batch of ``requests`` rows, greedy, each row ``output_len`` new tokens
(``min_new_tokens`` = ``max_new_tokens``; eos cannot end a row early).

Two rows:

- ``compiled``: ``cache_implementation="static"`` with ``compile_config=CompileConfig(
  fullgraph=True, mode="reduce-overhead")``, transformers' own static-cache + ``torch.compile``
  recipe: with a static cache on CUDA, ``generate`` compiles the model's decode step itself
  (``GenerationMixin._valid_auto_compile_criteria`` and ``get_compiled_call`` in transformers
  5.x; the prefill runs eager). Wrapping ``model.forward`` in ``torch.compile`` as well would
  only nest a second compile around it. CUDA only: on the CPU this row is not measured.
- ``eager``: the default dynamic cache, nothing compiled, for context.

Each row runs once untimed (compilation and CUDA-graph capture), then ``repeats`` timed runs,
synchronized before and after on CUDA; output tok/s = requests * output_len / seconds of each
run, and the row's figure is the median run's (the lower middle one of an even count, as the
server's rows). On the GPU machine, at 128 + 128 and at 1,024 + 128::

    loraflow bench serve --shape llama2-7b --requests 64 --prompt-len 128 --output-len 128 \\
        --adapters 64 --registered 1000 --repeats 3 --hf-baseline --out benchmarks/results
"""

from __future__ import annotations

import time

import torch


def hf_config(shape):
    """A ``LlamaConfig`` of the shape of a ``LlamaArgs``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.dim,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_seq_len,
        rms_norm_eps=shape.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        attention_bias=shape.qkv_bias,
        mlp_bias=shape.mlp_bias,
        tie_word_embeddings=shape.tie_embeddings,
    )


def hf_model(shape_name: str, shape, device: str, seed: int = 0):
    """The transformers model of the benchmark: the default model from its folder, or the
    server's random weights (``random_llama`` with the same seed, dtype and device) in a
    ``LlamaForCausalLM`` of that shape. bf16 on CUDA, float32 on the CPU."""
    from transformers import LlamaForCausalLM

    from loraflow.models.loading import default_model_path
    from loraflow.serve.llama import random_llama

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if shape_name == "default":
        return LlamaForCausalLM.from_pretrained(default_model_path(), dtype=dtype).to(device).eval()
    if shape.rope_scaling:
        raise ValueError("the transformers baseline builds default rope only; this shape scales it")
    cfg = hf_config(shape)
    state = random_llama(shape, dtype, device, seed).state_dict()  # the names are transformers' own
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"random weights do not fit LlamaForCausalLM: missing {missing[:5]}, extra {unexpected[:5]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its buffers were built on "meta"
    if cfg.tie_word_embeddings:  # assign=True gave lm_head a tensor of its own
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"tensors left unset: {left[:5]}")
    return model.to(device).eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate_row(
    model, prompts: list[list[int]], output_len: int, repeats: int, kind: str, keep_tokens: bool = False
) -> dict:
    """Time ``model.generate`` on all ``prompts`` as one batch: ``kind`` "compiled" (static
    cache, transformers' compiled decode step; CUDA), "static" (static cache, nothing
    compiled) or "eager" (dynamic cache). One untimed run first, then ``repeats`` timed ones.
    Every run must return each row's prompt and ``output_len`` new tokens; ``keep_tokens``
    adds the first timed run's new tokens (a list per row) as "tokens"."""
    from transformers import CompileConfig

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the prompts must have one length (one batch, no padding)")
    device = model.device
    if kind == "compiled" and device.type != "cuda":
        raise ValueError("the compiled static-cache generate runs on CUDA only")
    ids = torch.tensor(prompts, device=device)
    options = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        pad_token_id=0,
    )
    if kind == "compiled":
        options.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    elif kind == "static":
        options.update(cache_implementation="static", disable_compile=True)
    elif kind != "eager":
        raise ValueError(f"kind must be compiled, static or eager, got {kind!r}")

    def once():
        with torch.no_grad():  # as generate itself (inference tensors and compiled CUDA graphs are best kept apart)
            out = model.generate(**options)
        new = out[:, ids.shape[1] :]
        if tuple(new.shape) != (len(prompts), output_len) or not torch.equal(out[:, : ids.shape[1]], ids):
            raise RuntimeError(f"generate returned {tuple(out.shape)} for {len(prompts)} x {ids.shape[1]} prompts")
        return new

    start = time.perf_counter()
    once()  # warm-up: compiles and captures the decode step (kind "compiled")
    _sync(device)
    warmup_s = time.perf_counter() - start
    runs, first = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        new = once()
        _sync(device)
        wall = time.perf_counter() - start
        first = new.cpu() if first is None else first
        runs.append({"output_tokens": new.numel(), "wall_s": wall, "output_tokens_per_s": new.numel() / wall})
    median = sorted(runs, key=lambda r: r["output_tokens_per_s"])[(len(runs) - 1) // 2]
    row = {
        "kind": kind,
        "cache": "dynamic" if kind == "eager" else "static",
        "compiled": kind == "compiled" and hasattr(model, "_compiled_call"),  # generate did compile
        "requests": len(prompts),
        "batch": len(prompts),
        "prompt_len": ids.shape[1],
        "output_len": output_len,
        "output_tokens": median["output_tokens"],
        "wall_s": median["wall_s"],
        "output_tokens_per_s": median["output_tokens_per_s"],
        "warmup_s": warmup_s,
        "runs": runs,
    }
    if keep_tokens:
        row["tokens"] = first.tolist()
    return row


def baseline(model, prompts: list[list[int]], output_len: int, repeats: int) -> dict:
    """The ``--hf-baseline`` rows: "compiled" on CUDA (on the CPU a note says why it is
    missing) and "eager"; the compiled row runs first, while the GPU memory is all free."""
    out = {"batching": "one generate call of all requests as one batch (generate has no continuous batching)"}
    if model.device.type == "cuda":
        out["compiled"] = generate_row(model, prompts, output_len, repeats, "compiled")
        import torch._dynamo

        torch._dynamo.reset()  # the compiled step and its CUDA graphs are not needed again
        torch.cuda.empty_cache()
    else:
        out["compiled_note"] = "it needs CUDA, and this run was on the CPU"
    out["eager"] = generate_row(model, prompts, output_len, repeats, "eager")
    return out


def ratios(rows: dict, ours: float) -> dict:
    """Our output tok/s (with adapters) over each transformers row of ``baseline``."""
    return {f"ours_over_hf_{k}": ours / rows[k]["output_tokens_per_s"] for k in ("compiled", "eager") if k in rows}
