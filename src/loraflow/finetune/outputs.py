"""A fine-tuning run's output folder:

    OUT/adapter_config.json, adapter_model.safetensors  the adapter in PEFT's layout (the best
                                                       on the dev split, else the latest);
                                                       with --tenant: OUT/<tenant>/ each
    OUT/labels.json          classification: each head's column and classes
    OUT/model/               --method full / galore: the whole model, a Hugging Face folder
    OUT/run.json             the run's settings (what --resume checks) and data counts
    OUT/log.jsonl            one record per step; dev scores at each evaluation
    OUT/curves.png           training loss and dev metric against the step
    OUT/checkpoint/          the newest checkpoint (--resume continues from it)

Nothing is touched before the run's checks pass: an OUT holding an adapter is refused
unless ``overwrite``; ``resume`` refuses a folder of another run, naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from loraflow.atomic import atomic_write, recover_dir
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.model import save_adapter_to, save_model_to
from loraflow.train.checkpoint import checkpoint_paths, latest_checkpoint

RUN_NAME = "run.json"
LOG_NAME = "log.jsonl"
CKPT_FILES = ("trainable.safetensors", "state.pt")


class RunFolder:
    def __init__(self, out: Path, cfg: FinetuneConfig, writes: bool = True):
        self.out, self.cfg = out, cfg
        self.writes = writes  # several processes: the first writes, the others only keep count
        self.log_path = out / LOG_NAME

    def adapter_dir(self, tenant: str) -> Path:
        if not self.cfg.adapter:
            return self.out / "model"
        return self.out / tenant if self.cfg.tenants else self.out

    def prepare(self):
        """Check the folder against the run; returns the checkpoint to resume from, or None."""
        out, cfg = self.out, self.cfg
        parked = recover_dir(out)
        if parked is not None:  # a save over OUT was killed between the two renames of a swap
            os.replace(parked, out)  # (systems without an atomic exchange): put the whole folder back
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; choose a folder")
        found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        ours = (out / RUN_NAME).is_file()
        holds_adapter = (
            (out / "adapter_config.json").is_file()
            or (out / "model").is_dir()
            or any((out / n / "adapter_config.json").is_file() for n in cfg.tenants)
        )
        if cfg.resume:
            if not ours:
                raise FileNotFoundError(f"--resume: {out} holds no run of loraflow finetune ({RUN_NAME} is missing)")
            before = json.loads((out / RUN_NAME).read_text())["config"]
            now = cfg.identity()
            diff = [f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in now if before.get(k) != now[k]]
            if diff:
                raise ValueError(
                    f"--resume: {out} is another run (" + "; ".join(diff) + "); use the same settings, or start "
                    "a new run in another --out"
                )
            existing = latest_checkpoint(out, CKPT_FILES)
            if existing is None:
                raise FileNotFoundError(f"--resume: {out} holds no complete checkpoint yet; run without --resume")
            return existing
        if holds_adapter and not cfg.overwrite:
            raise ValueError(
                f"{out} already holds a fine-tuned adapter or model; pass --overwrite to replace it, --resume to "
                "continue its run, or choose another --out"
            )
        if found and not ours and not cfg.overwrite:
            raise ValueError(
                f"{out} is not empty ({', '.join(found[:4])}) and is no loraflow finetune folder; choose a new or "
                "empty --out"
            )
        if ours and not holds_adapter and latest_checkpoint(out, CKPT_FILES) is not None and not cfg.overwrite:
            raise ValueError(
                f"{out} holds a checkpoint of an unfinished run: pass --resume to continue it, or --overwrite"
            )
        out.mkdir(parents=True, exist_ok=True)
        for old in (*checkpoint_paths(out), self.log_path):  # a previous run's, given --overwrite
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        return None

    def write_run_json(self, data, resolved: dict) -> None:
        """run.json: the run's identity, its settings as given, what the defaults resolved to
        (``resolved``, e.g. padding-free or not) and the data's statistics."""
        if not self.writes:
            return
        info = {"config": self.cfg.identity(), "settings": vars(self.cfg), "resolved": resolved, "data": data.stats}
        text = json.dumps(info, indent=2, default=str) + "\n"
        atomic_write(self.out / RUN_NAME, lambda tmp: Path(tmp).write_text(text))

    def save_outputs(self, model, tok, data, tenants=None) -> None:
        if not self.writes:
            return
        for name in tenants or list(data.train):
            if self.cfg.adapter:
                save_adapter_to(model, name, self.adapter_dir(name), data.heads)
            else:
                save_model_to(model, tok, self.adapter_dir(name), data.heads)

    def metric(self, score: dict) -> float:
        """Higher is better: the macro-F1 (several heads: their mean) or minus the dev loss."""
        if self.cfg.task == "classification":
            return score.get("mean_macro_f1", score["macro_f1"])
        return -score["loss"]

    def keep_best(self, model, tok, data, scores: dict, best: dict, step: int) -> bool:
        """Save each tenant whose dev metric improved; True if any did."""
        better = [n for n, s in scores.items() if n not in best or self.metric(s) > best[n]["metric"]]
        for name in better:
            best[name] = {"metric": self.metric(scores[name]), "step": step, **_flat(scores[name])}
        if better:
            self.save_outputs(model, tok, data, better)
        return bool(better)

    def describe(self, scores: dict) -> str:
        key = "macro_f1" if self.cfg.task == "classification" else "loss"
        return " ".join(f"{s[key]:.4f}" for s in scores.values())

    def output_paths(self) -> dict[str, str]:
        names = list(self.cfg.tenants) or ["default"]
        return {n: str(self.adapter_dir(n)) for n in names}

    def plot(self) -> None:
        """OUT/curves.png: the training loss and the dev metric against the step."""
        if not self.writes:
            return
        if not self.log_path.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        if not records:
            return
        key = "macro_f1" if self.cfg.task == "classification" else "loss"
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
        a.set(xlabel="step", ylabel="training loss", title="training loss")
        evals = [r for r in records if "dev" in r]
        for name in sorted({n for r in evals for n in r["dev"]}):
            pts = [(r["step"], r["dev"][name][key]) for r in evals if name in r["dev"]]
            b.plot(*zip(*pts), marker="o", label=name)
        b.set(xlabel="step", ylabel=f"dev {key}", title=f"dev {key}")
        if len({n for r in evals for n in r["dev"]}) > 1:
            b.legend()
        fig.tight_layout()
        atomic_write(self.out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)


def _flat(score: dict) -> dict:
    return {k: v for k, v in score.items() if isinstance(v, (int, float)) or v is None}
