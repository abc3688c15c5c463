"""The baseline that `loraflow finetune` is measured against: transformers + PEFT with a plain
training loop, the same settings (LoRA r 8, alpha 16 on every linear layer, the `score` head
trained with it, 512 tokens, AdamW, warm-up then cosine, gradient clipping 1.0, bfloat16
autocast on CUDA) on the same rows in the same order (loraflow's tokenization and data order,
so only the training code differs), then scored on the dev split with the same metrics.

    python examples/medical_abstracts/peft_baseline.py --train train.csv --dev dev.csv --out runs/peft

Writes OUT/metrics.json (the dev metrics, "train_seconds": the training loop's wall-clock
with model loading left out, "tokens_per_s").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="a local model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-by-length", action="store_true", help="loraflow's batches of about one length")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loraflow.finetune.data import classification_examples, collate, read_rows
    from loraflow.finetune.evaluation import classification_scores
    from loraflow.finetune.sources import Order
    from loraflow.models.loading import default_model_path
    from loraflow.train.checkpoint import lr_factor

    folder = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train, classes, _ = classification_examples(read_rows(args.train), tok, "text", ["label"], args.max_length)
    dev, _, _ = classification_examples(read_rows(args.dev), tok, "text", ["label"], args.max_length, classes=classes)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(classes[0]), dtype=torch.bfloat16 if cuda else torch.float32, local_files_only=True
    ).to(args.device)
    base.config.pad_token_id = pad
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="SEQ_CLS")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **({"fused": True} if cuda else {}))
    steps = max(1, math.ceil(args.epochs * len(train) / args.batch_size))
    warmup = int(args.warmup * steps)
    lengths = [len(e.input_ids) for e in train] if args.group_by_length else None
    order = Order(len(train), args.seed, args.batch_size, lengths)  # the rows and order loraflow takes
    model.train()
    tokens, started = 0, time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, steps, warmup, floor=0.0)
        batch = collate([train[i] for i in order.rows(step)], pad)
        tokens += int(batch["attention_mask"].sum())
        b = {k: v.to(args.device) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["classes"][:, 0])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()
    seconds = time.perf_counter() - started
    model.eval()
    probs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for i in range(0, len(dev), 32):
            b = {k: v.to(args.device) for k, v in collate(dev[i : i + 32], pad).items()}
            probs.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().softmax(-1))
    scores = classification_scores([torch.cat(probs).cpu()], dev, [{"column": "label", "classes": classes[0]}])
    scores.pop("heads")
    scores.update({"train_seconds": seconds, "tokens_per_s": tokens / seconds, "steps": steps})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps({k: scores[k] for k in ("macro_f1", "accuracy", "train_seconds", "tokens_per_s")}))


if __name__ == "__main__":
    main()
