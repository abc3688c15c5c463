"""Train the example adapters that `make serve` serves, on the embedded SmolLM2-135M-Instruct.

    python examples/train_adapters.py [--steps 120] [--only shakespeare]

- shakespeare: continues text in the style of the plays (tinyshakespeare, plain text);
- medical: writes a medical abstract on a condition class (chat: "Write a medical abstract
  about <condition>." -> abstract);
- python: solves a programming problem in Python (MBPP, chat: problem -> code).

Each is a LoRA adapter (r 8, alpha 16, q/k/v/o) saved in PEFT's layout under
examples/adapters/<name>. Loss is on the answer tokens (with the template's end-of-turn
token, so that the adapter learns to stop) for the chat tasks.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch

import loraflow as lf

DATA = Path(__file__).parent / "data"


def shakespeare(tok, n, seq, rng):
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    ids = tok(text[: len(text) * 9 // 10], add_special_tokens=False)["input_ids"]  # last 10%: held out
    for _ in range(n):
        start = rng.randrange(0, len(ids) - seq)
        chunk = ids[start : start + seq]
        yield chunk, [1] * len(chunk)


def chat_pairs(tok, pairs, n, seq, rng):
    for _ in range(n):
        question, answer = rng.choice(pairs)
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert full.startswith(prompt), "the chat template must extend the prompt with the answer"
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:seq]  # the answer ends with end-of-turn
        yield ids, ([0] * len(p) + [1] * (len(ids) - len(p)))[:seq]


def medical(tok, n, seq, rng):
    names = {
        r["condition_label"]: r["condition_name"]
        for r in csv.DictReader(open(DATA / "medical_abstracts" / "labels.csv"))
    }
    rows = list(csv.DictReader(open(DATA / "medical_abstracts" / "abstracts.csv")))
    pairs = [
        (f"Write a medical abstract about {names[r['condition_label']]}.", r["medical_abstract"])
        for r in rows[: len(rows) * 9 // 10]
    ]
    return chat_pairs(tok, pairs, n, seq, rng)


def python(tok, n, seq, rng):
    rows = [json.loads(line) for line in open(DATA / "mbpp" / "mbpp.jsonl")]
    pairs = [
        (r["text"] + " Your code should pass: " + r["test_list"][0], r["code"].replace("\r\n", "\n"))
        for r in rows
        if 11 <= r["task_id"] <= 510
    ]  # MBPP's train + validation split
    return chat_pairs(tok, pairs, n, seq, rng)


TASKS = {"shakespeare": shakespeare, "medical": medical, "python": python}


def batches(examples, batch, pad_id):
    examples = list(examples)
    for i in range(0, len(examples), batch):
        group = examples[i : i + batch]
        width = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), width), pad_id)
        labels = torch.full((len(group), width), -100)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, (x, keep) in enumerate(group):
            ids[j, : len(x)] = torch.tensor(x)
            mask[j, : len(x)] = 1
            labels[j, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, keep)])
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--only", choices=sorted(TASKS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "adapters"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, make in TASKS.items():
        if args.only and name != args.only:
            continue
        model, tok = lf.load_model(device=args.device)
        lf.add_adapter(
            model, lf.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), name=name
        )
        params = lf.mark_trainable(model, name)
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
        model.train()
        rng = random.Random(0)
        start, losses = time.time(), []
        for step, batch in enumerate(
            batches(
                make(tok, args.steps * args.batch, args.seq, rng),
                args.batch,
                tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        ):
            loss = model(**{k: v.to(args.device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            losses.append(loss.item())
            if step % 10 == 0 or step == args.steps - 1:
                recent = sum(losses[-10:]) / len(losses[-10:])
                print(
                    f"{name} step {step + 1}/{args.steps} loss {recent:.3f} ({time.time() - start:.0f} s)", flush=True
                )
        lf.save_adapter(model, Path(args.out) / name, name=name)
        first, last = losses[:10], losses[-10:]
        print(
            f"saved {Path(args.out) / name}: mean loss of the first {len(first)} steps {sum(first) / len(first):.3f}, "
            f"of the last {len(last)} {sum(last) / len(last):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
