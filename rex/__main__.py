"""Command line: ``python -m rex {quantize,methods,models,datasets,bench} ...``.

Errors the user can fix (unknown names, bad bit-widths, missing data, corrupted checkpoints) are printed
as one message and exit with status 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _budget(v: str):
    if v.lower() in ("none", ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number >= 1 or 'none', got {v!r}") from None


def _bits(v: str):
    if v.lower() in ("none", "32", "fp", "float"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit-width must be an integer in 2..16 (or 32/none for float), got {v!r}") from None


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rex")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=_bits, default=8, help="activation bits, or 32/none for float")
    p.add_argument("--order", "-K", type=int, default=1)
    p.add_argument("--budget", type=_budget, default=None, help="BOPs ratio >= 1 (or absolute BOPs)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"])
    p.add_argument("--granularity", default="per_channel", choices=["per_channel", "per_tensor"])
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--mode", default="fake", choices=["fake", "int"])
    p.add_argument("--first-last", default="8bit", choices=["8bit", "same", "fp"])
    p.add_argument("--act-sigma", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method-specific option")


def spec_from_args(a):
    import yaml

    from .spec import QuantSpec

    opts = {}
    for kv in a.option:
        if "=" not in kv:
            from .errors import ConfigError

            raise ConfigError(f"--option expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        opts[k] = yaml.safe_load(v)
    return QuantSpec(
        method=a.method, wbits=a.wbits, abits=a.abits, order=a.order, budget=a.budget, allocation=a.allocation,
        granularity=a.granularity, symmetric=not a.asymmetric, mode=a.mode, first_last=a.first_last,
        act_sigma=a.act_sigma, seed=a.seed, options=opts,
    )


def _fmt_table(rows: list[dict], cols: list[str]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(f(x) for x in v) + "]"
        return str(v)

    cells = [[f(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def cmd_quantize(a) -> int:
    import torch

    import rex
    from .runner import classification_job

    torch.set_num_threads(a.threads)
    spec = spec_from_args(a)
    res = classification_job(a.model, spec, dataset=a.dataset if a.eval else None, limit=a.limit,
                             batch_size=a.batch_size, progress=not a.quiet, keep_model=True)
    qmodel = res.pop("qmodel")
    if not a.quiet:
        print(_fmt_table(rex.report(qmodel), ["name", "kind", "role", "wbits", "abits", "order", "densities",
                                              "max_err", "bound", "bound_ok", "act_range", "int32_safe"]))
    print()
    for k in ("model", "spec", "bops", "fp32_bops", "bops_ratio_vs_plain", "size_mbit", "quant_seconds",
              "fp32_top1", "top1", "top5", "agreement", "kl", "n", "eval_seconds"):
        if k in res:
            print(f"{k:>20}: {res[k]}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def cmd_methods(a) -> int:
    from .methods import list_methods

    for k, v in list_methods().items():
        print(f"{k:12s} {v}")
    return 0


def cmd_models(a) -> int:
    from .models import list_models

    for k in list_models():
        print(k)
    return 0


def cmd_datasets(a) -> int:
    from .data import list_datasets

    for k in list_datasets():
        print(k)
    return 0


def cmd_bench(a) -> int:
    from .bench import main as bench_main

    return bench_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rex", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="quantize one model, print the per-layer table and BOPs, optionally evaluate")
    q.add_argument("--model", default="mobilenet_v2")
    add_spec_args(q)
    q.add_argument("--eval", action="store_true", help="evaluate FP32 and quantized on the model's default dataset")
    q.add_argument("--dataset", default=None)
    q.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    q.add_argument("--batch-size", type=int, default=50)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--json", default=None, help="also write the results as JSON here")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_quantize)
    sub.add_parser("methods", help="list registered methods").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list registered models").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(fn=cmd_datasets)
    b = sub.add_parser("bench", help="speed / memory benchmark, writes a JSON+CSV file")
    b.add_argument("--models", default="mobilenet_v2,resnet20_fmnist")
    b.add_argument("--out", default="results/bench/bench.json")
    b.add_argument("--limit", type=int, default=200)
    b.add_argument("--batch-size", type=int, default=50)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--device", default="cpu")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    from .errors import RexError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
