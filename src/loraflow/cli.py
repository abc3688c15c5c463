"""``loraflow <command>``: thin scripts over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_prepare(args) -> None:
    """Convert the embedded default model into the cache (done once; later loads are fast)."""
    from loraflow.models.loading import default_model_path

    start = time.perf_counter()
    path = default_model_path()
    print(f"default model ready at {path} ({time.perf_counter() - start:.1f} s)")


def cmd_inspect(args) -> None:
    """Print an adapter folder's config and tensor shapes."""
    from safetensors import safe_open

    from loraflow.adapters.files import CONFIG_NAME, WEIGHTS_NAME, config_from_fields
    from pathlib import Path

    folder = Path(args.path)
    fields = json.loads((folder / CONFIG_NAME).read_text())
    print(config_from_fields(fields))
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            print(f"  {key}  {tuple(f.get_slice(key).get_shape())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("path", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    if args.version:
        from loraflow import __version__
        print(__version__)
        return
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    args.func(args)


if __name__ == "__main__":
    main()
