"""What ``loraflow inspect`` prints about an adapter folder: its config, its tensors and their
shapes, and, for a classifier that ``loraflow finetune --task classification`` wrote, the
trained modules saved with it (the ``score`` head) and its label columns."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraflow.adapters.files import PREFIX, read_adapter_files

LABELS_NAME = "labels.json"  # finetune's: {"heads": [{"column": ..., "classes": [...]}, ...]}


def describe_adapter(path: str | os.PathLike) -> str:
    """The config, one line per tensor (its key and shape), then the saved modules and the
    classifier's heads where there are some. Everything is checked as ``load_adapter`` checks
    it: a folder it would refuse raises its ValueError / FileNotFoundError."""
    config, by_module, saved = read_adapter_files(path)
    lines = [str(config)]
    for module, found in by_module.items():
        lines += [f"  {PREFIX}{module}.{suffix}  {tuple(t.shape)}" for suffix, t in sorted(found.items())]
    if saved:
        lines.append(f"trained modules saved with the adapter (modules_to_save): {', '.join(sorted(saved))}")
        for module, params in saved.items():
            lines += [f"  {PREFIX}{module}.{param}  {tuple(t.shape)}" for param, t in sorted(params.items())]
        lines += _heads(Path(path))
        lines.append(
            "a classifier: it loads on the model it was trained with (loraflow eval --adapter, "
            "lf.load_adapter on a *ForSequenceClassification model); loraflow serve, a causal-LM server, cannot "
            "serve it"
        )
    return "\n".join(lines)


def _heads(folder: Path) -> list[str]:
    """One line per label column of a classifier's labels.json; none when it has none."""
    try:
        heads = json.loads((folder / LABELS_NAME).read_text())["heads"]
        return [f"head {h['column']!r}: {len(h['classes'])} classes {h['classes']}" for h in heads]
    except (OSError, ValueError, KeyError, TypeError):
        return []
