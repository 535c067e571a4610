"""Generate the baselines table (method.md §7) for one classification model on the bundled data.

    .venv/bin/python workflow/scripts/baselines_table.py                      # MobileNetV2, 1000 images
    .venv/bin/python workflow/scripts/baselines_table.py --limit 200 --settings 4/4

Every number in the output is measured by this script through ``rex.runner.classification_job`` (the
project's protocol: BN folding, first/last layers W8A8 order 1, data-free activation ranges, the bundled
ImageNet sample). Per-configuration results are cached in ``<out>.json`` keyed by everything that changes
them -- the spec, model, dataset, image count, the weights' sha256 and the code version (commit, with
``+uncommitted`` for a dirty checkout) -- so an interrupted run resumes and nothing computed by other code or
other weights is reused; ``--fresh`` ignores the cache. Every row records the commit that computed it. Writes
``<out>.md``. In the pipeline this is the rule ``baselines`` (workflow/rules/baselines.smk; not in the default
target: ``make baselines``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rex.io import atomic_write_text  # noqa: E402

# The table's rows: registered methods (rex.methods; label = the registration's display name), each at its
# conf/method/<name>.yaml settings plus these overrides (the REx rows at K=2 under a 1.5x budget). Any other
# registered method can be added with --methods.
# zeroq_lite: ZeroQ's own distillation (method zeroq, --methods zeroq) costs about 4 h at 224 x 224 on 2 cores
DEFAULT_ROWS = ("rtn", "dfq", "squant", "ocs", "zeroq_lite", "rex", "rex_squant")
ROW_OVERRIDES = {
    "ocs": dict(options={"expand_ratio": 0.02}),
    "rex": dict(order=2, budget=1.5),
    "rex_squant": dict(order=2, budget=1.5),
}
PER_TENSOR = {  # the DFQ setting: per-tensor weight scales (row label -> method settings)
    "RTN": dict(name="rtn"),
    "DFQ, equalization only (ReLU6->ReLU + CLE)": dict(name="dfq", options={"absorb": False, "bias_correct": False}),
    "DFQ, + high-bias absorption": dict(name="dfq", options={"bias_correct": False}),
    "DFQ (+ bias correction)": dict(name="dfq"),
}


def make_spec(method: dict, wbits: int, abits: int, **protocol):
    """The row's QuantSpec through the pipeline's one validated path: conf/method/<name>.yaml, the row's
    overrides and the W/A setting, on conf/config.yaml's protocol."""
    import yaml

    from rex.spec import QuantSpec

    def load(path):
        with open(path) as f:
            return yaml.safe_load(f) or {}

    base = load(ROOT / "conf" / "method" / f"{method['name']}.yaml")
    proto = dict(load(ROOT / "conf" / "config.yaml").get("protocol") or {}, **protocol)
    return QuantSpec.from_config({**base, **method, "wbits": wbits, "abits": abits}, proto)


def row_label(spec) -> str:
    """'REx (K=2, budget 1.5)', 'OCS (expand 2%)', 'DFQ': the display name and what the row sets."""
    from rex.methods import get_entry

    parts = [f"K={spec.order}"] if spec.order > 1 else []
    if spec.budget is not None:
        parts.append(f"budget {spec.budget:g}")
    if spec.config is not None and spec.config.describe():
        parts.append(spec.config.describe())
    display = get_entry(spec.method).display
    return f"{display} ({', '.join(parts)})" if parts else display


def _git_commit() -> str:
    """HEAD's commit (+uncommitted for a dirty checkout), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0 or not out.stdout.strip():
        return "unknown"
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


COMMIT = _git_commit()


def _weights_sha(model_name: str):
    from rex.models import get_entry

    return getattr(get_entry(model_name), "sha256", None)


def _key(model_name, spec, dataset, limit) -> str:
    """Everything that changes a row: spec (or fp32), model, dataset, image count, weights, code version."""
    what = spec.hash() if spec is not None else "fp32"
    return f"{what}|{model_name}|{dataset}|{limit}|{_weights_sha(model_name)}|{COMMIT}"


def run_one(model_name, spec, dataset, limit, cache, cache_path, fresh):
    from rex.runner import classification_job

    key = _key(model_name, spec, dataset, limit)
    if not fresh and key in cache:
        return cache[key]
    t0 = time.perf_counter()
    out = classification_job(model_name, spec, dataset=dataset, limit=limit, progress=False, keep_model=True)
    q = out.pop("qmodel", None)
    info = getattr(q, "rex_info", None)
    row = {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool, type(None)))}
    row["extra"] = json.loads(json.dumps(info.extra, default=str)) if info is not None else {}
    row["spec_dict"] = spec.to_dict() if spec is not None else None
    row["wall_seconds"] = round(time.perf_counter() - t0, 2)
    row["commit"] = COMMIT
    row["dataset"] = dataset
    cache[key] = row
    atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True))
    label = spec.label() if spec is not None else "fp32"
    print(f"  {label}: top1 {row.get('top1')} agree {row.get('agreement')} bops {row.get('bops')} "
          f"({row['wall_seconds']} s)", flush=True)
    return row


def _fmt(v, nd=1):
    return "—" if v is None else f"{v:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--dataset", default="imagenet_sample")
    ap.add_argument("--limit", type=int, default=None, help="number of images (default: all)")
    ap.add_argument("--settings", default="8/8,6/6,4/8,4/4", help="comma-separated W/A pairs")
    ap.add_argument("--methods", default=",".join(DEFAULT_ROWS), help="comma-separated registered method names "
                    "(python -m rex methods), default " + ",".join(DEFAULT_ROWS))
    ap.add_argument("--per-tensor", default="8/8", help="W/A settings of the per-tensor (DFQ) table; '' to skip")
    ap.add_argument("--out", default=None, help="output .md (default results/tables/baselines_<model>.md)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore cached per-configuration results")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from rex.reference import load_published

    out = Path(args.out) if args.out else ROOT / "results" / "tables" / f"baselines_{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_path = out.with_suffix(".json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    settings = [tuple(int(b) for b in s.split("/")) for s in args.settings.split(",") if s]
    labels = [m for m in args.methods.split(",") if m]
    from rex.methods import method_names

    unknown = [m for m in labels if m not in method_names() or m == "fp32"]
    if unknown:
        ap.error(f"unknown method keys {unknown}; known: {method_names()}")
    t_all = time.perf_counter()
    print(f"FP32 {args.model} on {args.dataset} (limit {args.limit})", flush=True)
    fp = run_one(args.model, None, args.dataset, args.limit, cache, cache_path, args.fresh)
    grid: dict = {}
    labels_of: dict = {}
    for w, a in settings:
        print(f"W{w}A{a}", flush=True)
        for lab in labels:
            spec = make_spec(dict(name=lab, **ROW_OVERRIDES.get(lab, {})), w, a)
            labels_of[lab] = row_label(spec)
            grid[(lab, w, a)] = run_one(args.model, spec, args.dataset, args.limit, cache, cache_path, args.fresh)
    pt_settings = [tuple(int(b) for b in s.split("/")) for s in args.per_tensor.split(",") if s]
    pt: dict = {}
    for w, a in pt_settings:
        print(f"per-tensor W{w}A{a}", flush=True)
        for lab, kw in PER_TENSOR.items():
            spec = make_spec(kw, w, a, granularity="per_tensor")
            pt[(lab, w, a)] = run_one(args.model, spec, args.dataset, args.limit, cache, cache_path, args.fresh)

    n = fp.get("n")
    nd = 2 if (n or 0) >= 5000 else 1  # accuracy digits: one image is 0.01 points on 10,000 images
    lines = [
        f"# Data-free baselines on {args.model} ({args.dataset}, {n} images)",
        "",
        "Generated by `workflow/scripts/baselines_table.py` "
        f"(`{' '.join(['python', 'workflow/scripts/baselines_table.py'] + (argv if argv is not None else sys.argv[1:]))}`), "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, commit {COMMIT}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Do not edit by hand.",
        "",
        "Protocol (every row): BN folded; first and last layers W8A8 at order 1 (`first_last=8bit`); other layers "
        "symmetric per-output-channel weights; activations per tensor with data-free ranges from the folded BN "
        "statistics (beta + n|gamma|, n by bit-width) except ZeroQ, whose ranges come from its distilled data; "
        "the network input range from the preprocessing. BOPs per image (MACs x b_w x b_a x sum of kept densities, "
        "float layers 32x32), recomputed from the quantized model. Top-1 in percent on "
        f"`{args.dataset}` ({n} images, so one image is {100 / max(1, n or 1):.2g} points); agreement = % of images "
        "with the FP32 top-1 class.",
        "",
        f"FP32: top-1 **{_fmt(fp.get('top1'), nd)}**, {fp.get('bops', 0) / 1e9:.1f} GBOPs.",
        "",
    ]
    head = "| Method | " + " | ".join(f"W{w}A{a} top-1 | W{w}A{a} GBOPs" for w, a in settings) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(settings))]
    lines.append("| FP32 | " + " | ".join(f"{_fmt(fp.get('top1'), nd)} | {fp.get('bops', 0) / 1e9:.1f}" for _ in settings) + " |")
    for lab in labels:
        cells = []
        for w, a in settings:
            r = grid[(lab, w, a)]
            cells.append(f"{_fmt(r.get('top1'), nd)} | {r.get('bops', 0) / 1e9:.2f}")
        lines.append(f"| {labels_of[lab]} | " + " | ".join(cells) + " |")
    lines += ["", "Details (agreement with FP32, BOPs relative to RTN at the same W/A, quantization time):", "",
              "| W/A | Method | top-1 | top-5 | agreement | BOPs vs RTN | quant s | notes |", "|---|---|---|---|---|---|---|---|"]
    for w, a in settings:
        base = grid.get(("rtn", w, a), {}).get("bops")
        for lab in labels:
            r = grid[(lab, w, a)]
            ex = r.get("extra", {})
            note = []
            if "zeroq_seconds" in ex:
                note.append(f"distillation+ranges {ex['zeroq_seconds']} s (batch {ex['zeroq']['batch']}, "
                            f"{ex['zeroq']['steps']} steps{', cached' if ex['zeroq'].get('distill_cached') else ''})")
            if "ocs" in ex:
                note.append(f"{ex['ocs']['channels_added']} channels added")
            if "dfq" in ex:
                d = ex["dfq"]
                note.append(f"{d['pairs']} pairs, {d['absorbed']} absorbed, {d['bias_corrected']} biases corrected")
            ratio = None if not base else r.get("bops", 0) / base
            lines.append(f"| W{w}A{a} | {labels_of[lab]} | {_fmt(r.get('top1'), nd)} | {_fmt(r.get('top5'), nd)} | {_fmt(r.get('agreement'), nd)} | "
                         f"{_fmt(ratio, 3)} | {_fmt(r.get('quant_seconds'), 1)} | {'; '.join(note)} |")
    if pt:
        lines += ["", "## Per-tensor weights (the DFQ setting)", "",
                  "Same protocol with `granularity=per_tensor` (one weight scale per layer).", "",
                  "| W/A | Method | top-1 | agreement | GBOPs |", "|---|---|---|---|---|"]
        for (lab, w, a), r in pt.items():
            lines.append(f"| W{w}A{a} | {lab} | {_fmt(r.get('top1'), nd)} | {_fmt(r.get('agreement'), nd)} | {r.get('bops', 0) / 1e9:.2f} |")
    pub = load_published(model=args.model)
    if pub:
        lines += ["", "## Published numbers (other protocols, for reference only)", "",
                  "Not measured here: other weights, full ImageNet val (50k). From `rex/reference/published.yaml`.", "",
                  "| Method | Variant | W/A | FP32 | top-1 | Weights | Source |", "|---|---|---|---|---|---|---|"]
        for e in pub:
            lines.append(f"| {e['method']} | {e.get('variant', '')} | W{e['wbits']}A{e['abits']} | {e.get('fp32_top1', '')} | "
                         f"{e['top1']} | {e.get('weights', '')} | {e['source']} |")
    rows = [fp] + list(grid.values()) + list(pt.values())
    lines += ["", f"Compute: {sum(r.get('wall_seconds', 0) for r in rows) / 60:.0f} min summed over the "
              f"{len(rows)} configurations (quantize + evaluate, when each was run); this invocation "
              f"{time.perf_counter() - t_all:.0f} s (configurations already in `{cache_path.name}` are reused).", ""]
    commits = sorted({r.get("commit", "unknown") for r in rows})
    lines += [f"Every row computed at commit {commits[0]}." if len(commits) == 1 else
              "Rows computed at commits " + ", ".join(commits) + " (see `commit` in the .json).", ""]
    atomic_write_text(out, "\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
