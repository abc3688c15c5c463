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


def cmd_bench_kernels(args) -> None:
    """Time the per-row adapter ops (GPU); write JSON, Markdown and PNG under --out."""
    import torch
    from tqdm import tqdm

    from loraflow.bench import kernels, kernels_report, report
    from loraflow.bench.timing import copy_bandwidth_gbs, warm_up_gpu

    if not torch.cuda.is_available():
        sys.exit("loraflow bench kernels needs a CUDA GPU (its figures are GPU figures)")
    cases = kernels.grid(quick=args.quick)
    warm_up_gpu()
    bandwidth = copy_bandwidth_gbs()
    if args.sweep:
        import itertools
        decode = kernels.Case("decode", 4096, 4096, 64, 1, 16, "distinct")
        prefill = kernels.Case("prefill", 4096, 4096, 16, 256, 16, "distinct")
        rows_cfgs = [dict(block_k=bk, split_k=sk, block_n=bn, warps=w) for bk, sk, bn, w in
                     itertools.product([256, 512], [4, 8, 16], [128, 256, 512], [4, 8])]
        tile_cfgs = [dict(block_m=bm, block_k=bk, split_k=sk, block_n=bn, warps=w) for bm, bk, sk, bn, w in
                     itertools.product([32, 64], [64, 128], [1, 2, 4, 8], [64, 128], [4, 8])]
        for case, cfgs in [(decode, rows_cfgs), (prefill, tile_cfgs)]:
            res = sorted(kernels.sweep(case, cfgs), key=lambda r: r["addon_us"])
            print(f"{case.kind}: copy bandwidth {bandwidth:.0f} GB/s; best of {len(res)}:")
            for r in res[:6] + res[-2:]:
                print("  ", r)
        return
    errors = {f"{c.kind} {c.rows}x{c.T} r{c.rank} {c.mix}": kernels.check_case(c)
              for c in cases if c.kind != "flora" and c.d_in == 4096 and c.d_out == 4096}
    bad = {k: e for k, e in errors.items() if not e < 1e-2}
    if bad:
        sys.exit(f"kernels disagree with the float64 loop: {bad}")
    rows = []
    for case in tqdm(cases, desc="cases"):
        rows.append(kernels.run_case(case, bandwidth, peft=not args.no_peft))
    env = report.environment()
    payload = {"environment": env, "copy_bandwidth_gbs": bandwidth, "max_rel_error_bf16": max(errors.values()),
               "targets": kernels_report.targets(rows), "cases": rows}
    paths = report.write(args.out, "kernels" + ("-quick" if args.quick else ""), payload,
                         kernels_report.markdown(env, bandwidth, rows), kernels_report.figure(rows))
    print(kernels_report.markdown(env, bandwidth, rows).split("## decode")[0])
    print("wrote", *paths)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("prepare", help=cmd_prepare.__doc__).set_defaults(func=cmd_prepare)
    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("path", help="an adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=cmd_inspect)
    bench = sub.add_parser("bench", help="benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("kernels", help=cmd_bench_kernels.__doc__)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    p.add_argument("--quick", action="store_true", help="three cases only (a smoke run)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed-batch forward")
    p.add_argument("--sweep", action="store_true", help="time launch configurations on the target cases")
    p.set_defaults(func=cmd_bench_kernels)
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
