"""Benchmark results as committed files: JSON (every number), Markdown (tables), PNG (plots),
each with the device, the date and the command that produced them."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from loraflow.atomic import atomic_write


def environment() -> dict:
    import torch

    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["loraflow"] + sys.argv[1:])
        if sys.argv[0].endswith(("loraflow", "loraflow/cli.py"))
        else " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def pyplot():
    """matplotlib's pyplot without a display, or an error that says what to install."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("benchmark plots need matplotlib: pip install 'loraflow[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write(out_dir: str | os.PathLike, stem: str, payload: dict, markdown: str, figure) -> list[Path]:
    """Write ``stem``.json, .md and .png, each atomically (temp file, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    for path, write_to in [
        (paths[0], lambda p: p.write_text(json.dumps(payload, indent=1) + "\n")),
        (paths[1], lambda p: p.write_text(markdown)),
        (paths[2], lambda p: figure.savefig(p, dpi=110, bbox_inches="tight", format="png")),
    ]:
        atomic_write(path, lambda tmp: write_to(Path(tmp)))
    return paths


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])
