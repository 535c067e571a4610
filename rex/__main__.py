"""Command line: ``python -m rex {quantize,methods,models,datasets,bench} ...``.

Errors the user can fix (unknown names, bad bit-widths, bad arguments, missing data, corrupted checkpoints)
are printed as one line ``error: <what is wrong, what is accepted, how to fix>`` on stderr and exit with
status 2, never as a traceback; nothing is written (``--json`` is written atomically, only on success).
Library warnings (e.g. int32 overflow risk in mode=int) are printed as one line ``warning: ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .io import atomic_write_json


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``error: ...``, exit 2), not the usage block."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)  # --wbit must not silently mean --wbits
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _typed(what: str, cast, kind: str, bound=None):
    """An argparse ``type=`` that names the argument in its one-line error; ``bound`` = (test, text)."""
    def parse(v: str):
        try:
            x = cast(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got {v!r}") from None
        if bound is not None and not bound[0](x):
            raise argparse.ArgumentTypeError(f"{what} must be {kind} ({bound[1]}), got {x}")
        return x

    parse.__name__ = what
    return parse


def _positive_int(what: str):
    return _typed(what, int, "a positive integer", (lambda n: n >= 1, ">= 1"))


def _int(what: str):
    return _typed(what, int, "an integer")


def _float(what: str):
    return _typed(what, float, "a number")


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


def _wbits(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight bit-width must be an integer in 2..16, got {v!r}") from None


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rex")
    p.add_argument("--wbits", type=_wbits, default=4, help="weight bits per expansion term, 2..16")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits, or 32/none for float")
    p.add_argument("--order", "-K", type=_int("order"), default=1, help="expansion order K >= 1")
    p.add_argument("--budget", type=_budget, default=None, help="BOPs ratio >= 1 (or absolute BOPs)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"])
    from .protocols import PRESETS

    p.add_argument("--preset", default="shared", choices=list(PRESETS),
                   help="named protocol (rex/protocols.py): " + "; ".join(f"{k}: {v.description}" for k, v in
                                                                         PRESETS.items()))
    # the protocol flags below default to the preset's value (None); given, they override it
    p.add_argument("--granularity", default=None, choices=["per_channel", "per_tensor", "per_group"],
                   help="weight scales (default: the preset's; shared: per_channel)")
    p.add_argument("--group-size", type=_positive_int("group-size"), default=None,
                   help="with --granularity per_group: inputs per weight scale along a row (e.g. 128)")
    p.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, default=None,
                   help="asymmetric weight grid (default: the preset's; shared: symmetric)")
    p.add_argument("--symmetric", dest="symmetric", action="store_const", const=True,
                   help="symmetric weight grid (overrides an asymmetric preset)")
    p.add_argument("--mode", default="fake", choices=["fake", "int"])
    p.add_argument("--first-last", default=None, choices=["8bit", "same", "fp"],
                   help="first/last-layer policy (default: the preset's; shared: 8bit)")
    p.add_argument("--act-sigma", type=_float("act-sigma"), default=None)
    p.add_argument("--range-propagation", default="moments", choices=["none", "moments", "interval"],
                   help="range of a layer input no BatchNorm/LayerNorm precedes, through the preceding layer")
    p.add_argument("--seed", type=_int("seed"), default=0, help="seed of every random draw (ZeroQ)")
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
        if not k:
            from .errors import ConfigError

            raise ConfigError(f"--option expects KEY=VALUE with a non-empty KEY, got {kv!r}")
        try:
            opts[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            opts[k] = v
    return QuantSpec(
        method=a.method, wbits=a.wbits, abits=a.abits, order=a.order, budget=a.budget, allocation=a.allocation,
        granularity=a.granularity, group_size=a.group_size, symmetric=a.symmetric, mode=a.mode,
        first_last=a.first_last, act_sigma=a.act_sigma, seed=a.seed, options=opts, preset=a.preset,
        range_propagation=a.range_propagation,
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


def _write_json_atomic(path: Path, obj) -> None:
    from .errors import ConfigError

    try:
        atomic_write_json(path, obj, end="", indent=2, default=str)
    except OSError as exc:
        raise ConfigError(f"cannot write --json {path}: {exc.strerror or exc}; choose a writable path") from None


def cmd_quantize(a) -> int:
    import torch

    import rex
    from .errors import ConfigError
    from .models import get_entry
    from .runner import classification_job

    torch.set_num_threads(a.threads)
    spec = spec_from_args(a)  # validate everything before loading anything
    entry = get_entry(a.model)
    if entry.task != "classification":
        raise ConfigError(f"`python -m rex quantize` runs classification models; {a.model} is a {entry.task} model "
                          "(run it through the pipeline: python -m rex.pipeline.job ... evaluation=" + entry.task + ")")
    dataset = a.dataset or (entry.default_dataset if a.eval else None)
    if a.dataset and not a.eval:
        a.eval = True  # --dataset implies --eval
    if a.data_root and not dataset:
        raise ConfigError("--data-root needs --eval (or --dataset): it is the folder of the evaluation set")
    if a.weights is not None and not Path(a.weights).is_file():
        from .errors import CheckpointError

        raise CheckpointError(f"--weights {a.weights}: no such file; give the path of a state_dict saved with "
                              "torch.save(model.state_dict(), path)")
    res = classification_job(a.model, spec, dataset=dataset, limit=a.limit, batch_size=a.batch_size,
                             progress=not a.quiet, keep_model=True, dataset_root=a.data_root, weights=a.weights,
                             threads=a.threads)
    qmodel = res.pop("qmodel")
    if not a.quiet:
        print(_fmt_table(rex.report(qmodel), ["name", "kind", "role", "wbits", "abits", "order", "densities",
                                              "max_err", "bound", "bound_ok", "act_range", "int32_safe"]))
    print()
    for k in ("model", "spec", "preset", "bops", "fp32_bops", "bops_ratio_vs_plain", "size_mbit", "quant_seconds",
              "fp32_top1", "top1", "top5", "agreement", "kl", "n", "eval_seconds"):
        if k in res:
            print(f"{k:>20}: {res[k]}")
    if a.json:
        _write_json_atomic(Path(a.json), res)
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


def writable_file(path, flag: str) -> Path:
    """``path``'s folder exists (created if needed) and takes a new file; else a ConfigError naming ``flag``."""
    from .errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path, e.g. {path / 'bench.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder of {flag} {path}: {exc.strerror or exc}; "
                          "choose a writable path") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {flag} {path}: its folder {path.parent} is not writable; "
                          "choose a writable path")
    return path


def cmd_bench(a) -> int:
    from .bench import main as bench_main

    writable_file(a.out, "--out")  # before minutes of benchmarking, not after
    return bench_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rex", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    q = sub.add_parser("quantize", help="quantize one model, print the per-layer table and BOPs, optionally evaluate")
    q.add_argument("--model", default="mobilenet_v2")
    add_spec_args(q)
    q.add_argument("--weights", default=None, help="a state_dict file to load instead of the registered weights")
    q.add_argument("--eval", action="store_true", help="evaluate FP32 and quantized on the model's default dataset")
    q.add_argument("--dataset", default=None, help="evaluation set (implies --eval; default: the model's)")
    q.add_argument("--data-root", default=None, help="folder of the evaluation set (default: the registry's)")
    q.add_argument("--limit", type=_positive_int("limit"), default=None, help="evaluate on the first N images only")
    q.add_argument("--batch-size", type=_positive_int("batch-size"), default=50)
    q.add_argument("--threads", type=_positive_int("threads"), default=2)
    q.add_argument("--json", default=None, help="also write the results as JSON here")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_quantize)
    sub.add_parser("methods", help="list registered methods").set_defaults(fn=cmd_methods)
    sub.add_parser("models", help="list registered models").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(fn=cmd_datasets)
    b = sub.add_parser("bench", help="speed / memory benchmark, writes a JSON+CSV file")
    b.add_argument("--models", default="mobilenet_v2,resnet20_fmnist")
    b.add_argument("--out", default="results/bench/bench.json")
    b.add_argument("--limit", type=_positive_int("limit"), default=200)
    b.add_argument("--batch-size", type=_positive_int("batch-size"), default=50)
    b.add_argument("--threads", type=_positive_int("threads"), default=2)
    b.add_argument("--device", default="cpu")
    b.add_argument("--only", default="", help="comma-separated substrings of configuration labels to run (fp32 always runs)")
    b.add_argument("--quant-speed", action="store_true", help="time rex.quantize alone (1 and --threads threads)")
    b.add_argument("--repeats", type=_positive_int("repeats"), default=3, help="--quant-speed: best of N runs")
    b.set_defaults(fn=cmd_bench)
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    from .errors import RexError, RexWarning

    args = build_parser().parse_args(argv)
    from .runtime import keep_freed_memory

    keep_freed_memory()  # large activations reuse the heap instead of fresh pages per layer (rex.runtime)
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RexWarning):
            print(f"warning: {_one_line(message)}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        return args.fn(args)
    except RexError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = default_show


if __name__ == "__main__":
    sys.exit(main())
