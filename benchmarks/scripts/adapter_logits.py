"""Teacher-forced log-probabilities of the embedded model with each example adapter: ours (the
serving engine, paged attention, banked adapters, CUDA graphs where they apply) against
transformers + PEFT on the same device and dtype (bf16 on CUDA, float32 on the CPU).

For each of base, python, medical and shakespeare: transformers + PEFT greedily continue a prompt
by N tokens; at every position of that continuation both models see the same prefix (ours: one
request per prefix, max_tokens=1, logprobs=5; theirs: one forward over the whole sequence), and
we compare the top-1 token and the log-probabilities of our top 5. Where the top-1 tokens differ,
the reference's margin between its first and second token says whether it was a near-tie. Then
both greedy continuations side by side: where ours leaves theirs, and the margin there.

    python benchmarks/scripts/adapter_logits.py OUT.json [--tokens 48]
"""

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

import loraflow as lf
from loraflow.models.loading import default_model_path
from loraflow.serve.sampling import SamplingParams

EXAMPLES = Path(__file__).parents[2] / "examples" / "adapters"
TASKS = {
    None: "Write a function to add two numbers.",
    "python": "Write a function to add two numbers.",
    "medical": "What are the symptoms of type 2 diabetes?",
    "shakespeare": None,  # plain text: "ROMEO:\n"
}


def prompt_ids(tok, adapter):
    if TASKS[adapter] is None:
        return tok("ROMEO:\n", add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": TASKS[adapter]}]
    return tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def reference(adapter, ids, n, device, dtype):
    """transformers (+ PEFT): the greedy continuation of ``ids`` and the log-softmax at every position."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(default_model_path(), dtype=dtype).to(device).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, EXAMPLES / adapter).to(device).eval()
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        logp = torch.log_softmax(model(out).logits[0].float(), -1)
    return out[0].tolist(), logp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    eng = lf.Engine(adapter_dir=EXAMPLES, device=device, dtype=dtype, max_batch_tokens=4096, max_gpu_adapters=4)
    tok, rows = eng.tokenizer, []
    for adapter in TASKS:
        p = prompt_ids(tok, adapter)
        full, logp = reference(adapter, p, args.tokens, device, dtype)
        forced = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
        reqs = [eng.add_request(full[:j], forced, adapter) for j in range(len(p), len(full))]
        greedy = eng.add_request(p, SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True), adapter)
        while eng.has_work():
            eng.step()
        worst, parted = 0.0, []
        for j, r in zip(range(len(p), len(full)), reqs):
            token, _, top = r.logprobs[0]
            ref = logp[j - 1]
            worst = max(worst, max(abs(lp - ref[t].item()) for t, lp in top))
            ref_top = ref.topk(2)
            if token != ref_top.indices[0].item():
                parted.append({"position": j - len(p), "margin": (ref_top.values[0] - ref_top.values[1]).item()})
        ours = greedy.output_ids
        theirs = full[len(p) :]
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        margin = None
        if first is not None:
            ref_top = logp[len(p) + first - 1].topk(2)
            margin = (ref_top.values[0] - ref_top.values[1]).item()
        rows.append(
            {
                "adapter": adapter or "base",
                "positions": len(reqs),
                "max_abs_logprob_diff_top5": worst,
                "top1_differs": parted,
                "greedy_first_difference": first,
                "reference_margin_there": margin,
                "ours": tok.decode(ours),
                "theirs": tok.decode(theirs),
            }
        )
        print({k: v for k, v in rows[-1].items() if k not in ("ours", "theirs")}, flush=True)
    eng.registry.close()
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/adapter_logits.py {args.out} --tokens {args.tokens}",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
