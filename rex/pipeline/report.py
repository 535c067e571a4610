"""``summary.csv`` + ``jobs.csv`` -> tables (Markdown, CSV, LaTeX), accuracy-vs-BOPs plots, ``report.md``.

    python -m rex.pipeline.report table --summary results/summary.csv --jobs results/jobs.csv \\
        --task classification --model mobilenet_v2 --out-prefix results/tables/classification_mobilenet_v2
    python -m rex.pipeline.report plot  ... --out results/plots/classification_mobilenet_v2.png
    python -m rex.pipeline.report page  --summary ... --jobs ... --out results/report.md

Tables: one row per job (methods x settings), FP32 first; BOPs in G-BOPs; failed jobs show ``failed`` in every
metric cell; the caption states the protocol (first/last-layer policy, granularity, dataset and its size with
the binomial noise of an accuracy measured on it). The Markdown file adds a compact pivot of the primary metric
(variants x W/A settings).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

from ..io import atomic_write, atomic_write_text
from . import grid as gridlib

METHOD_DISPLAY = {"fp32": "FP32", "rtn": "RTN", "rex": "REx", "dfq": "DFQ", "squant": "SQuant", "ocs": "OCS",
                  "zeroq": "ZeroQ", "rex_dfq": "REx+DFQ", "rex_squant": "REx+SQuant"}
METHOD_ORDER = ["fp32", "rtn", "dfq", "squant", "ocs", "zeroq", "zeroq_lite", "rex", "rex_dfq", "rex_squant"]
METRIC_DISPLAY = {"top1": "top-1 (%)", "top5": "top-5 (%)", "agreement": "agree (%)", "kl": "KL (nats)",
                  "AP": "AP", "AP50": "AP50", "AP75": "AP75", "mIoU": "mIoU (%)"}
FIRST_LAST = {"8bit": "first and last layers kept at W8A8, order 1",
              "same": "first and last layers quantized like the others",
              "fp": "first and last layers left in float"}


def _read(summary: Path, jobs: Path):
    import pandas as pd

    s = pd.read_csv(summary, keep_default_na=True)
    j = pd.read_csv(jobs, keep_default_na=True)
    return s, j


def method_display(method: str) -> str:
    base, _, alloc = str(method).partition("-")
    name = METHOD_DISPLAY.get(base, base)
    return f"{name} ({alloc})" if alloc else name


def _isnum(v) -> bool:
    try:
        return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""
    except TypeError:
        return False


def fmt_gbops(bops) -> str:
    if not _isnum(bops):
        return "-"
    g = float(bops) / 1e9
    return f"{g:.3f}" if g < 10 else f"{g:.2f}" if g < 100 else f"{g:.1f}"


def fmt_metric(metric: str, v, status: str) -> str:
    if status != "ok":
        return "failed"
    if not _isnum(v):
        return "-"
    return f"{float(v):.4f}" if metric == "kl" else f"{float(v):.2f}"


def fmt_float_inputs(r) -> str:
    """'float inputs / layers' of a quantized row ('-' for FP32 and for rows from before the column existed):
    a row labelled A4 whose layers kept float inputs shows how many did."""
    if str(r["method"]) == "fp32" or not (_isnum(r.get("act_float")) and _isnum(r.get("act_layers"))):
        return "-"
    return f"{int(float(r['act_float']))}/{int(float(r['act_layers']))}"


def fmt_float_layers(r) -> str:
    """Weight layers left float because rex does not quantize their type (LSTM, GRU, ...), for a quantized row
    ('-' for FP32 and for rows from before the column existed): 0 when every weight layer was quantized."""
    if str(r["method"]) == "fp32" or not _isnum(r.get("float_layers")):
        return "-"
    return str(int(float(r["float_layers"])))


def fmt_budget(order, budget) -> str:
    if _isnum(budget):
        return f"{float(budget):g}x"
    return "dense" if int(order) > 1 else "-"


def preset_cell(r) -> str:
    """The row's protocol preset ('-' for FP32; rows from before presets existed ran the shared protocol)."""
    if str(r["method"]) == "fp32":
        return "-"
    v = r.get("preset")
    return str(v) if _isnum(v) and str(v) else "shared"


def _preset_rank(name: str) -> int:
    from ..protocols import preset_names

    names = preset_names()
    return names.index(name) if name in names else len(names)


def _sort_key(r) -> tuple:
    base = str(r["method"]).split("-")[0]
    fp = 0 if base == "fp32" else 1
    return (fp, -int(r["wbits"]), -int(r["abits"]), METHOD_ORDER.index(base) if base in METHOD_ORDER else 99,
            str(r["method"]), int(r["order"]), float(r["budget"]) if _isnum(r["budget"]) else -1.0,
            _preset_rank(preset_cell(r)), str(r.get("variant") or ""))


def job_table(summary: Path, jobs: Path, task: str, model: str):
    """One row per job of (task, model): the ordered list of dicts used by every output format."""
    s, j = _read(summary, jobs)
    s = s[(s.task == task) & (s.model == model)]
    j = j[(j.task == task) & (j.model == model)]
    metrics = list(gridlib.METRICS[task])
    # the variant (the folder's p= hash) tells apart two rows of one method and setting under two protocols
    keys = ["method", "wbits", "abits", "order", "budget"] + [k for k in ("variant",) if k in s and k in j]
    rows = []
    for _, jr in j.iterrows():
        sel = s
        for k in keys:
            sel = sel[sel[k].isna()] if not _isnum(jr[k]) else sel[sel[k].astype(str) == str(jr[k])]
        vals = {m: (sel[sel.metric == m].value.iloc[0] if len(sel[sel.metric == m]) else None) for m in metrics}
        rows.append({**{k: jr[k] for k in keys}, "status": jr["status"], "bops": jr["bops"],
                     "label": jr["label"], "error": jr.get("error"), "values": vals,
                     "act_layers": jr.get("act_layers"), "act_float": jr.get("act_float"),
                     "float_layers": jr.get("float_layers"), "float_layer_names": jr.get("float_layer_names"),
                     "preset": jr.get("preset")})
    rows.sort(key=_sort_key)
    return rows, j


def caption(task: str, model: str, j) -> str:
    def first(col, default=""):
        vals = [v for v in j[col].tolist() if _isnum(v)] if col in j else []
        return vals[0] if vals else default

    model_d = first("model_display", model)
    data_d = first("dataset_display", first("dataset", "?"))
    n = first("n", None)
    n_txt = f"n = {int(float(n))} images" if _isnum(n) else "n = ?"
    noise = ""
    if task == "classification" and _isnum(n):
        fp = j[(j.method == "fp32") & (j.status == "ok")]
        p = float(fp.primary_value.iloc[0]) / 100 if len(fp) and _isnum(fp.primary_value.iloc[0]) else 0.5
        sd = 100 * math.sqrt(max(p * (1 - p), 1e-12) / float(n))
        noise = (f"; binomial standard deviation of an accuracy near the FP32 top-1 ({100 * p:.1f} %): "
                 f"+-{sd:.1f} points")
    elif _isnum(n):
        noise = "; a small set: treat sub-point differences as noise"
    from ..protocols import PRESETS

    quant = j[j.method != "fp32"] if "method" in j else j
    presets = sorted({preset_cell({"method": "q", "preset": v}) for v in
                      (quant["preset"].tolist() if "preset" in quant else [])} or {"shared"}, key=_preset_rank)
    shared = j[[preset_cell({"method": "q", "preset": v}) == "shared" for v in j["preset"]]] if "preset" in j else j
    sj = shared if len(shared) else j

    def first_s(col, default=""):
        vals = [v for v in sj[col].tolist() if _isnum(v)] if col in sj else []
        return vals[0] if vals else default

    fl = FIRST_LAST.get(str(first_s("first_last", "8bit")), str(first_s("first_last", "")))
    gran = str(first_s("granularity", "per_channel")).replace("_", "-")
    sym = first_s("symmetric", True)
    sym_t = "symmetric" if str(sym).lower() in ("true", "1") else "asymmetric"
    sources = sorted({str(v) for v in j["act_ranges"].tolist() if _isnum(v) and str(v)}) if "act_ranges" in j else []
    ranges = ("activation ranges from " + " / ".join(sources) if sources
              else "activation ranges from BatchNorm statistics (beta + n|gamma|)")
    others = [p for p in presets if p != "shared"]
    if others:  # several protocols in one table: each row names its preset (the Preset column)
        proto = ("Protocols (column Preset): " + "; ".join(
            f"{p} = {PRESETS[p].description if p in PRESETS else 'unknown preset'}" for p in presets)
            + f"; shared rows: weights {gran} {sym_t}, {fl}")
    else:
        proto = f"Protocol: preset shared, data-free; weights {gran} {sym_t}, {fl}"
    fold = "BatchNorm folded" if not others else "BatchNorm folded unless the preset keeps it"
    return (f"{model_d} on {data_d} ({n_txt}{noise}). {proto}; "
            f"{ranges}; activations quantized at layer inputs (residual adds, pooling and concatenation in "
            f"float, in integer mode too); 'Float in' = layer inputs left float / layers; 'Float layers' = weight "
            f"layers of a type rex does not quantize (LSTM, GRU, ...), left float and not in G-BOPs; {fold}. "
            f"BOPs in G-BOPs (1e9 bit-operations, rex.bops: MACs x weight bits x activation bits, summed over "
            f"expansion terms). Failed jobs are shown as 'failed'.")


def _md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        s = s.replace(a, b)
    return s


def write_tables(summary: Path, jobs: Path, task: str, model: str, out_prefix: Path) -> list:
    import csv
    import io

    rows, j = job_table(summary, jobs, task, model)
    metrics = list(gridlib.METRICS[task])
    cap = caption(task, model, j)
    # Preset after the columns that were there before it, so that their positions hold
    header = (["Method", "W/A", "K", "Budget", "G-BOPs", "Float in", "Float layers", "Preset"]
              + [METRIC_DISPLAY.get(m, m) for m in metrics])
    body = []
    for r in rows:
        wa = "32/32" if str(r["method"]) == "fp32" else f"W{int(r['wbits'])}A{int(r['abits'])}"
        body.append([method_display(r["method"]), wa, int(r["order"]), fmt_budget(r["order"], r["budget"]),
                     fmt_gbops(r["bops"]), fmt_float_inputs(r), fmt_float_layers(r), preset_cell(r)]
                    + [fmt_metric(m, r["values"][m], r["status"]) for m in metrics])
    primary = gridlib.PRIMARY_METRIC[task]
    # pivot: variants x W/A settings, primary metric
    settings, variants, cells = [], [], {}
    for r in rows:
        wa = "FP32" if str(r["method"]) == "fp32" else f"W{int(r['wbits'])}A{int(r['abits'])}"
        var = (method_display(r["method"]) + ("" if int(r["order"]) == 1 else f" K={int(r['order'])}")
               + (f" b={float(r['budget']):g}" if _isnum(r["budget"]) else "")
               + ("" if preset_cell(r) in ("-", "shared") else f" [{preset_cell(r)}]"))
        if wa not in settings:
            settings.append(wa)
        if var not in variants:
            variants.append(var)
        cells[(var, wa)] = fmt_metric(primary, r["values"][primary], r["status"])
    pivot = [[v] + [cells.get((v, s), "") for s in settings] for v in variants]
    failed = [r for r in rows if r["status"] != "ok"]
    md = [f"**{cap}**", "", _md_table(header, body), ""]
    md += [f"{METRIC_DISPLAY.get(primary, primary)} at a glance:", "", _md_table(["Variant"] + settings, pivot), ""]
    named = sorted({str(r["float_layer_names"]) for r in rows
                    if str(r["method"]) != "fp32" and _isnum(r.get("float_layer_names"))})
    if named:
        md += ["Layers left float (not quantized, not in G-BOPs): " + " | ".join(named), ""]
    if failed:
        md += ["Failed jobs:", ""] + [f"- `{r['label']}`: {r['error']}" for r in failed] + [""]
    files = []
    out_prefix = Path(out_prefix)
    atomic_write_text(out_prefix.with_suffix(".md"), "\n".join(md))
    files.append(out_prefix.with_suffix(".md"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "wbits", "abits", "order", "budget", "allocation", "preset", "bops", "gbops"] + metrics
               + ["float_inputs", "layers", "float_layers", "status", "label", "error"])
    for r in rows:
        alloc = str(r["method"]).partition("-")[2] or "uniform"
        w.writerow([str(r["method"]).partition("-")[0], int(r["wbits"]), int(r["abits"]), int(r["order"]),
                    r["budget"] if _isnum(r["budget"]) else "", alloc, "" if preset_cell(r) == "-" else preset_cell(r),
                    int(float(r["bops"])) if _isnum(r["bops"]) else "",
                    fmt_gbops(r["bops"]) if _isnum(r["bops"]) else ""]
                   + [("failed" if r["status"] != "ok" else (r["values"][m] if _isnum(r["values"][m]) else ""))
                      for m in metrics]
                   + [int(float(r["act_float"])) if _isnum(r.get("act_float")) else "",
                      int(float(r["act_layers"])) if _isnum(r.get("act_layers")) else "",
                      int(float(r["float_layers"])) if _isnum(r.get("float_layers")) else "",
                      r["status"], r["label"], r["error"] if _isnum(r["error"]) else ""])
    atomic_write_text(out_prefix.with_suffix(".csv"), buf.getvalue())
    files.append(out_prefix.with_suffix(".csv"))
    tex = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{llcl rrrl" + "r" * len(metrics) + "}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    tex += [" & ".join(_tex_escape(str(c)) for c in row) + r" \\" for row in body]
    tex += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex_escape(cap) + "}",
            r"\label{tab:" + _tex_escape(f"{task}-{model}").replace(r"\_", "-") + "}", r"\end{table}", ""]
    atomic_write_text(out_prefix.with_suffix(".tex"), "\n".join(tex))
    files.append(out_prefix.with_suffix(".tex"))
    return files


def write_plot(summary: Path, jobs: Path, task: str, model: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, j = job_table(summary, jobs, task, model)
    primary = gridlib.PRIMARY_METRIC[task]
    ok = [r for r in rows if r["status"] == "ok" and _isnum(r["bops"]) and _isnum(r["values"][primary])]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = []
    for r in ok:
        if r["method"] not in methods and r["method"] != "fp32":
            methods.append(r["method"])
    for i, meth in enumerate(methods):
        c = colors[i % len(colors)]
        dense = sorted([r for r in ok if r["method"] == meth and not _isnum(r["budget"])],
                       key=lambda r: float(r["bops"]))
        budg = sorted([r for r in ok if r["method"] == meth and _isnum(r["budget"])], key=lambda r: float(r["bops"]))
        if dense:
            ax.plot([float(r["bops"]) / 1e9 for r in dense], [float(r["values"][primary]) for r in dense], "o-",
                    color=c, label=method_display(meth), ms=4, lw=1)
            for r in dense:
                k = "" if int(r["order"]) == 1 else f" K{int(r['order'])}"
                ax.annotate(f"W{int(r['wbits'])}A{int(r['abits'])}{k}",
                            (float(r["bops"]) / 1e9, float(r["values"][primary])), fontsize=5, alpha=0.6,
                            color=c, xytext=(2, -6), textcoords="offset points")
        if budg:
            ax.scatter([float(r["bops"]) / 1e9 for r in budg], [float(r["values"][primary]) for r in budg],
                       marker="^" if "-" in meth else "x", color=c, s=30, zorder=3,
                       label=f"{method_display(meth)} budgets" if dense or "-" not in meth else method_display(meth))
            for r in budg:
                ax.annotate(f"W{int(r['wbits'])}A{int(r['abits'])} K{int(r['order'])} b{float(r['budget']):g}",
                            (float(r["bops"]) / 1e9, float(r["values"][primary])), fontsize=5, alpha=0.7,
                            xytext=(2, 2), textcoords="offset points")
    fp = [r for r in ok if r["method"] == "fp32"]
    if fp:
        x, y = float(fp[0]["bops"]) / 1e9, float(fp[0]["values"][primary])
        ax.scatter([x], [y], marker="*", s=90, color="k", zorder=4, label="FP32")
        ax.axhline(y, color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("G-BOPs (log scale)")
    ax.set_ylabel(METRIC_DISPLAY.get(primary, primary))
    first = j.iloc[0] if len(j) else None
    data_d = first["dataset_display"] if first is not None and _isnum(first["dataset_display"]) else ""
    model_d = first["model_display"] if first is not None and _isnum(first["model_display"]) else model
    ax.set_title(f"{model_d} - {data_d}", fontsize=9)
    n_failed = sum(1 for r in rows if r["status"] != "ok")
    if n_failed:
        ax.text(0.99, 0.01, f"{n_failed} failed job(s) not shown", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="crimson")
    ax.grid(True, which="both", alpha=0.25)
    if ok:
        ax.legend(fontsize=7, loc="lower right" if not n_failed else "center right")
    else:
        ax.text(0.5, 0.5, "no successful job", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out


def write_page(summary: Path, jobs: Path, out: Path, grid_name: str = "", tracking_uri: Optional[str] = None,
               tables: Optional[list] = None, plots: Optional[list] = None) -> Path:
    import pandas as pd

    j = pd.read_csv(jobs)
    out = Path(out)
    base = out.parent
    rel = lambda p: os.path.relpath(Path(p), base)  # noqa: E731
    n, n_failed = len(j), int((j.status != "ok").sum())
    lines = [f"# REx benchmark report (grid `{grid_name}`)", "",
             f"{n} jobs, {n - n_failed} ok, {n_failed} failed. Source of truth: the job folders under "
             f"`{rel(base / 'runs')}/`; summary: [{rel(summary)}]({rel(summary)}) "
             f"(one row per job and metric), [{rel(jobs)}]({rel(jobs)}) (one row per job).", ""]
    pairs = []
    for _, r in j[["task", "model"]].drop_duplicates().iterrows():
        pairs.append((r.task, r.model))
    for task, model in pairs:
        stem = f"{task}_{model}"
        md = next((Path(t) for t in (tables or []) if Path(t).name == f"{stem}.md"), None)
        png = next((Path(p) for p in (plots or []) if Path(p).name == f"{stem}.png"), None)
        lines += [f"## {task}: {model}", ""]
        if png is not None:
            lines += [f"![{stem}]({rel(png)})", ""]
        if md is not None and md.is_file():
            lines += [md.read_text().strip(), "",
                      f"Files: [{rel(md)}]({rel(md)}), [{rel(md.with_suffix('.csv'))}]({rel(md.with_suffix('.csv'))}), "
                      f"[{rel(md.with_suffix('.tex'))}]({rel(md.with_suffix('.tex'))})", ""]
    failed = j[j.status != "ok"]
    if len(failed):
        lines += ["## Failed jobs", "", "| task | model | job | error |", "|---|---|---|---|"]
        for _, r in failed.iterrows():
            err = str(r.error).replace("|", "/") if _isnum(r.error) else ""
            lines.append(f"| {r.task} | {r.model} | `{r.label}` | {err[:200]} |")
        lines.append("")
    if tracking_uri:
        lines += ["## MLflow", "", "Every job is one MLflow run (tag `config_hash`), browse them with:", "",
                  f"    mlflow ui --backend-store-uri {tracking_uri}", ""]
    atomic_write_text(out, "\n".join(lines))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rex.pipeline.report", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("table", "plot", "page"):
        p = sub.add_parser(name)
        p.add_argument("--summary", required=True)
        p.add_argument("--jobs", required=True)
        if name != "page":
            p.add_argument("--task", required=True)
            p.add_argument("--model", required=True)
    sub.choices["table"].add_argument("--out-prefix", required=True)
    sub.choices["plot"].add_argument("--out", required=True)
    pg = sub.choices["page"]
    pg.add_argument("--out", required=True)
    pg.add_argument("--grid", default="")
    pg.add_argument("--tracking-uri", default=None)
    pg.add_argument("--tables", nargs="*", default=[])
    pg.add_argument("--plots", nargs="*", default=[])
    a = ap.parse_args(argv)
    if a.cmd == "table":
        for f in write_tables(Path(a.summary), Path(a.jobs), a.task, a.model, Path(a.out_prefix)):
            print(f)
    elif a.cmd == "plot":
        print(write_plot(Path(a.summary), Path(a.jobs), a.task, a.model, Path(a.out)))
    else:
        print(write_page(Path(a.summary), Path(a.jobs), Path(a.out), a.grid, a.tracking_uri, a.tables, a.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
