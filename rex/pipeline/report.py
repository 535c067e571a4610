"""``summary.csv`` + ``jobs.csv`` -> tables (Markdown, CSV, LaTeX), accuracy-vs-BOPs plots, ``report.md``.

    python -m rex.pipeline.report table --summary results/summary.csv --jobs results/jobs.csv \\
        --task classification --model mobilenet_v2 --out-prefix results/tables/classification_mobilenet_v2
    python -m rex.pipeline.report plot  ... --out results/plots/classification_mobilenet_v2.png
    python -m rex.pipeline.report page  --summary ... --jobs ... --out results/report.md

Tables: one row per job (methods x settings), FP32 first; the cost the row's regime is about (G-BOPs for W/A
rows, bits per weight for weight-only rows, both for FP32); the primary metric's delta vs FP32 (quantized minus
FP32, so a positive perplexity delta is a loss) and the best row of each W/A setting in bold (the lowest for a
lower-is-better metric: perplexity, KL); the wall time of each job; failed jobs show ``failed`` in every metric
cell, a method that does not apply ``n/a (<reason>)``; the caption states the protocol (first/last-layer policy,
granularity, dataset and its size with the binomial noise of an accuracy measured on it). The Markdown file adds a
compact pivot of the primary metric (variants x W/A settings). Plots: the primary metric against the cost, one
panel per regime (BOPs, bits per weight).
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
                  "zeroq": "ZeroQ", "zeroq_lite": "ZeroQ-lite", "hqq": "HQQ", "rex_dfq": "REx+DFQ",
                  "rex_squant": "REx+SQuant"}
METHOD_ORDER = ["fp32", "rtn", "dfq", "squant", "ocs", "zeroq", "zeroq_lite", "hqq", "rex", "rex_dfq", "rex_squant"]
METRIC_DISPLAY = {"top1": "top-1 (%)", "top5": "top-5 (%)", "agreement": "agree (%)", "kl": "KL (nats)",
                  "AP": "AP", "AP50": "AP50", "AP75": "AP75", "mIoU": "mIoU (%)", "spearman": "Spearman x100",
                  "perplexity": "perplexity"}
NOT_APPLICABLE = gridlib.NOT_APPLICABLE
FIRST_LAST = {"8bit": "first and last layers kept at W8A8, order 1",
              "same": "first and last layers quantized like the others",
              "fp": "first and last layers left in float"}


def _read(summary: Path, jobs: Path):
    import pandas as pd

    # only empty cells are missing: pandas' default NA strings include "n/a", a job status here
    s = pd.read_csv(summary, keep_default_na=False, na_values=[""])
    j = pd.read_csv(jobs, keep_default_na=False, na_values=[""])
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


def fmt_metric(metric: str, v, status: str, reason=None) -> str:
    if status == NOT_APPLICABLE:
        return f"n/a ({reason})" if _isnum(reason) else "n/a"
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


def weight_only(r) -> bool:
    """A quantized row with float activations: its cost is memory (bits per weight), not BOPs."""
    return str(r["method"]) != "fp32" and _isnum(r["abits"]) and int(float(r["abits"])) == gridlib.FLOAT_BITS


def fmt_bits(bpw) -> str:
    return f"{float(bpw):.3g}" if _isnum(bpw) else "-"


def fmt_delta(metric: str, v, ref) -> str:
    """Quantized minus FP32, signed (a perplexity that rose reads +, a Spearman that fell reads -)."""
    if not (_isnum(v) and _isnum(ref)):
        return "-"
    d = float(v) - float(ref)
    return f"{d:+.4f}" if metric == "kl" else f"{d:+.2f}"


def fmt_seconds(v) -> str:
    return f"{float(v):.1f}" if _isnum(v) else "-"


def setting(r) -> str:
    """The row's W/A setting, with its weight group size when per group (W4A32 g128); FP32 for the float row."""
    if str(r["method"]) == "fp32":
        return "FP32"
    g = f" g{int(float(r['group_size']))}" if _isnum(r.get("group_size")) else ""
    return f"W{int(r['wbits'])}A{int(r['abits'])}{g}"


def best_rows(rows: list, metric: str) -> set:
    """Indices of the best quantized row of each W/A setting that holds two rows or more (highest, or lowest for
    a lower-is-better metric; ties all marked); FP32 is the reference, never the best."""
    best: dict = {}
    sign = 1.0 if gridlib.higher_is_better(metric) else -1.0
    for i, r in enumerate(rows):
        v = r["values"].get(metric)
        if str(r["method"]) == "fp32" or r["status"] != "ok" or not _isnum(v) or math.isnan(float(v)):
            continue
        best.setdefault(setting(r), []).append((sign * float(v), i))
    out = set()
    for cands in best.values():
        if len(cands) < 2:
            continue  # nothing to compare with
        top = max(c[0] for c in cands)
        out |= {i for v, i in cands if v == top}
    return out


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
    g = float(r["group_size"]) if _isnum(r.get("group_size")) else float("inf")  # per channel first
    return (fp, -int(r["wbits"]), -int(r["abits"]), -g, METHOD_ORDER.index(base) if base in METHOD_ORDER else 99,
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
                     "preset": jr.get("preset"),
                     **{k: jr.get(k) for k in ("bits_per_weight", "group_size", "reason", "wall_seconds",
                                               "fp32_primary")}})
    rows.sort(key=_sort_key)
    return rows, j


def caption(task: str, model: str, j) -> str:
    def first(col, default=""):
        vals = [v for v in j[col].tolist() if _isnum(v)] if col in j else []
        return vals[0] if vals else default

    model_d = first("model_display", model)
    data_d = first("dataset_display", first("dataset", "?"))
    n = first("n", None)
    unit = {"text_similarity": "sentence pairs", "language_modeling": "windows"}.get(task, "images")
    n_txt = f"n = {int(float(n))} {unit}" if _isnum(n) else "n = ?"
    if task == "language_modeling" and _isnum(n) and _isnum(first("window", None)):
        n_txt = (f"{int(float(first('tokens', 0)))} tokens in {int(float(n))} non-overlapping window(s) of "
                 f"{int(float(first('window')))}; FP32 = the model as loaded")
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
    groups = sorted({int(float(g)) for g in j["group_size"].tolist() if _isnum(g)}) if "group_size" in j else []
    if groups:
        gran += f" (rows marked gN: per group of N inputs, N = {', '.join(map(str, groups))})"
    primary = gridlib.PRIMARY_METRIC.get(task, "")
    better = "higher" if gridlib.higher_is_better(primary) else "lower"
    others = [p for p in presets if p != "shared"]
    if others:  # several protocols in one table: each row names its preset (the Preset column)
        proto = ("Protocols (column Preset): " + "; ".join(
            f"{p} = {PRESETS[p].description if p in PRESETS else 'unknown preset'}" for p in presets)
            + f"; shared rows: weights {gran} {sym_t}, {fl}")
    else:
        proto = f"Protocol: preset shared, data-free; weights {gran} {sym_t}, {fl}"
    fold = "BatchNorm folded" if not others else "BatchNorm folded unless the preset keeps it"
    bn = "" if task in ("text_similarity", "language_modeling") else f"; {fold}"
    return (f"{model_d} on {data_d} ({n_txt}{noise}). {proto}; "
            f"{ranges}; activations quantized at layer inputs (residual adds, pooling and concatenation in "
            f"float, in integer mode too); 'Float in' = layer inputs left float / layers; 'Float layers' = weight "
            f"layers of a type rex does not quantize (LSTM, GRU, ...), left float and not in G-BOPs{bn}. "
            f"Cost: BOPs in G-BOPs for W/A rows (1e9 bit-operations, rex.bops: MACs x weight bits x activation "
            f"bits, summed over expansion terms); bits per weight for weight-only rows (A32 = float "
            f"activations; integers, 16-bit scales, zero points and sparse-order masks over the quantized "
            f"layers' weights). {METRIC_DISPLAY.get(primary, primary)}: {better} is better; the best row of each "
            f"W/A setting in bold; delta = quantized - FP32. 'Wall (s)': the job's wall time (load, quantize, "
            f"evaluate; one thread). Failed jobs are shown as 'failed', methods that do not apply to the model "
            f"as 'n/a (reason)'.")


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
    primary = gridlib.PRIMARY_METRIC[task]
    cap = caption(task, model, j)
    fp_row = next((r for r in rows if str(r["method"]) == "fp32" and r["status"] == "ok"), None)
    fp_value = fp_row["values"][primary] if fp_row is not None else None

    def ref(r):  # the FP32 value the row is compared with: the table's FP32 row, else the job's own record
        return fp_value if _isnum(fp_value) else r.get("fp32_primary")

    best = best_rows(rows, primary)
    wo = any(weight_only(r) for r in rows)  # a weight-only row: the table shows bits per weight
    # Preset after Float layers (main's order); Bits/weight only when the table holds weight-only rows
    header = (["Method", "W/A", "K", "Budget", "G-BOPs"] + (["Bits/weight"] if wo else [])
              + ["Float in", "Float layers", "Preset"]
              + [METRIC_DISPLAY.get(m, m) for m in metrics] + [f"delta {METRIC_DISPLAY.get(primary, primary)}",
                                                               "Wall (s)"])

    def cells(r, i, bold):
        wa = "32/32" if str(r["method"]) == "fp32" else setting(r)
        fp = str(r["method"]) == "fp32"
        gbops = "-" if weight_only(r) else fmt_gbops(r["bops"])  # each row shows the cost of its regime
        bits = [fmt_bits(r.get("bits_per_weight")) if (weight_only(r) or fp) else "-"] if wo else []
        vals = []
        for m in metrics:
            v = fmt_metric(m, r["values"][m], r["status"], r.get("reason"))
            vals.append(bold(v) if m == primary and i in best else v)
        delta = "-" if fp or r["status"] != "ok" else fmt_delta(primary, r["values"][primary], ref(r))
        return ([method_display(r["method"]), wa, int(r["order"]), fmt_budget(r["order"], r["budget"]), gbops]
                + bits + [fmt_float_inputs(r), fmt_float_layers(r), preset_cell(r)] + vals
                + [delta, fmt_seconds(r.get("wall_seconds"))])

    body = [cells(r, i, lambda v: f"**{v}**") for i, r in enumerate(rows)]
    # pivot: variants x W/A settings, primary metric
    settings, variants, pcells = [], [], {}
    for i, r in enumerate(rows):
        wa = setting(r)
        var = (method_display(r["method"]) + ("" if int(r["order"]) == 1 else f" K={int(r['order'])}")
               + (f" b={float(r['budget']):g}" if _isnum(r["budget"]) else "")
               + ("" if preset_cell(r) in ("-", "shared") else f" [{preset_cell(r)}]"))
        if wa not in settings:
            settings.append(wa)
        if var not in variants:
            variants.append(var)
        v = fmt_metric(primary, r["values"][primary], r["status"], r.get("reason"))
        pcells[(var, wa)] = f"**{v}**" if i in best else v
    pivot = [[v] + [pcells.get((v, st), "") for st in settings] for v in variants]
    failed = [r for r in rows if r["status"] not in ("ok", NOT_APPLICABLE)]
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
               + [f"delta_{primary}", "best", "bits_per_weight", "group_size", "wall_seconds"]
               + ["float_inputs", "layers", "float_layers", "status", "label", "error"])
    for i, r in enumerate(rows):
        alloc = str(r["method"]).partition("-")[2] or "uniform"
        d = (float(r["values"][primary]) - float(ref(r))
             if r["status"] == "ok" and str(r["method"]) != "fp32" and _isnum(r["values"][primary]) and _isnum(ref(r))
             else "")
        w.writerow([str(r["method"]).partition("-")[0], int(r["wbits"]), int(r["abits"]), int(r["order"]),
                    r["budget"] if _isnum(r["budget"]) else "", alloc, "" if preset_cell(r) == "-" else preset_cell(r),
                    int(float(r["bops"])) if _isnum(r["bops"]) else "",
                    fmt_gbops(r["bops"]) if _isnum(r["bops"]) else ""]
                   + [(r["status"] if r["status"] != "ok" else (r["values"][m] if _isnum(r["values"][m]) else ""))
                      for m in metrics]
                   + [d, int(i in best), r.get("bits_per_weight") if _isnum(r.get("bits_per_weight")) else "",
                      int(float(r["group_size"])) if _isnum(r.get("group_size")) else "",
                      r.get("wall_seconds") if _isnum(r.get("wall_seconds")) else ""]
                   + [int(float(r["act_float"])) if _isnum(r.get("act_float")) else "",
                      int(float(r["act_layers"])) if _isnum(r.get("act_layers")) else "",
                      int(float(r["float_layers"])) if _isnum(r.get("float_layers")) else "",
                      r["status"], r["label"],
                      r["error"] if _isnum(r["error"]) else (r.get("reason") if _isnum(r.get("reason")) else "")])
    atomic_write_text(out_prefix.with_suffix(".csv"), buf.getvalue())
    files.append(out_prefix.with_suffix(".csv"))
    tbody = [cells(r, i, lambda v: "\x00B" + v + "\x00E") for i, r in enumerate(rows)]
    tex = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{llcl " + "".join("l" if h == "Preset" else "r" for h in header[4:]) + "}", r"\toprule",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    tex += [" & ".join(_tex_escape(str(c)).replace("\x00B", r"\textbf{").replace("\x00E", "}") for c in row)
            + r" \\" for row in tbody]
    tex += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex_escape(cap) + "}",
            r"\label{tab:" + _tex_escape(f"{task}-{model}").replace(r"\_", "-") + "}", r"\end{table}", ""]
    atomic_write_text(out_prefix.with_suffix(".tex"), "\n".join(tex))
    files.append(out_prefix.with_suffix(".tex"))
    return files


def _cost(r, regime: str):
    """x of a row on the regime's axis: G-BOPs, or bits per weight."""
    v = r["bops"] if regime == "bops" else r.get("bits_per_weight")
    return (float(v) / 1e9 if regime == "bops" else float(v)) if _isnum(v) else None


def write_plot(summary: Path, jobs: Path, task: str, model: str, out: Path) -> Path:
    """The primary metric against the cost: one panel per regime present (W/A rows against G-BOPs, weight-only
    rows against bits per weight), FP32 as a star and a dotted line on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, j = job_table(summary, jobs, task, model)
    primary = gridlib.PRIMARY_METRIC[task]
    ok = [r for r in rows if r["status"] == "ok" and _isnum(r["values"][primary])]
    regimes = [g for g, test in (("bops", lambda r: not weight_only(r)), ("bits", weight_only))
               if any(test(r) and str(r["method"]) != "fp32" for r in ok)] or ["bops"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.4 * len(regimes), 4.4), dpi=120, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = []
    for r in ok:
        if r["method"] not in methods and r["method"] != "fp32":
            methods.append(r["method"])
    fp = [r for r in ok if r["method"] == "fp32"]
    from matplotlib.ticker import FuncFormatter, LogLocator

    for ax, regime in zip(axes[0], regimes):
        mine = [r for r in ok if r["method"] != "fp32" and weight_only(r) == (regime == "bits")
                and _cost(r, regime) is not None]
        for i, meth in enumerate(methods):
            c = colors[i % len(colors)]
            own = [r for r in mine if r["method"] == meth]
            # per-group rows are their own series (another cost / accuracy trade-off than per channel)
            for g in sorted({r.get("group_size") if _isnum(r.get("group_size")) else -1 for r in own}):
                sub = [r for r in own if (r.get("group_size") if _isnum(r.get("group_size")) else -1) == g]
                name = method_display(meth) + (f" g{int(float(g))}" if g != -1 else "")
                dense = sorted([r for r in sub if not _isnum(r["budget"])], key=lambda r: _cost(r, regime))
                budg = sorted([r for r in sub if _isnum(r["budget"])], key=lambda r: _cost(r, regime))
                ls = "--" if g != -1 else "-"
                if dense:
                    ax.plot([_cost(r, regime) for r in dense], [float(r["values"][primary]) for r in dense], "o",
                            ls=ls, color=c, label=name, ms=4, lw=1)
                    for r in dense:
                        k = "" if int(r["order"]) == 1 else f" K{int(r['order'])}"
                        ax.annotate(f"{setting(r)}{k}", (_cost(r, regime), float(r["values"][primary])), fontsize=5,
                                    alpha=0.6, color=c, xytext=(2, -6), textcoords="offset points")
                if budg:
                    ax.scatter([_cost(r, regime) for r in budg], [float(r["values"][primary]) for r in budg],
                               marker="^" if "-" in meth else "x", color=c, s=30, zorder=3,
                               label=f"{name} budgets" if dense or "-" not in meth else name)
                    for r in budg:
                        ax.annotate(f"{setting(r)} K{int(r['order'])} b{float(r['budget']):g}",
                                    (_cost(r, regime), float(r["values"][primary])), fontsize=5, alpha=0.7,
                                    xytext=(2, 2), textcoords="offset points")
        if fp and _cost(fp[0], regime) is not None:
            y = float(fp[0]["values"][primary])
            if regime == "bops":  # the float model's own cost; on the memory axis it would sit at 32 bits, far off
                ax.scatter([_cost(fp[0], regime)], [y], marker="*", s=90, color="k", zorder=4, label="FP32")
            ax.axhline(y, color="k", ls=":", lw=0.8, label=None if regime == "bops" else "FP32")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if regime == "bops" else
                                              (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("G-BOPs (log scale)" if regime == "bops" else
                      "bits per weight (weight-only rows; scales, zero points, masks included; log scale)")
        ax.set_ylabel(METRIC_DISPLAY.get(primary, primary)
                      + ("" if gridlib.higher_is_better(primary) else " (lower is better)"))
        if primary in gridlib.LOWER_IS_BETTER and mine:
            vals = [float(r["values"][primary]) for r in mine + fp]
            if max(vals) > 20 * max(min(vals), 1e-9):
                ax.set_yscale("log")  # a collapsed row (perplexity in the thousands) must not flatten the others
        ax.grid(True, which="both", alpha=0.25)
        if mine or fp:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no successful job", transform=ax.transAxes, ha="center")
    first = j.iloc[0] if len(j) else None
    data_d = first["dataset_display"] if first is not None and _isnum(first["dataset_display"]) else ""
    model_d = first["model_display"] if first is not None and _isnum(first["model_display"]) else model
    fig.suptitle(f"{model_d} - {data_d}", fontsize=9)
    n_failed = sum(1 for r in rows if r["status"] not in ("ok", NOT_APPLICABLE))
    n_na = sum(1 for r in rows if r["status"] == NOT_APPLICABLE)
    note = ", ".join(t for t in (f"{n_failed} failed job(s)" if n_failed else "",
                                 f"{n_na} n/a job(s)" if n_na else "") if t)
    if note:
        axes[0][-1].text(0.99, 0.01, f"{note} not shown", transform=axes[0][-1].transAxes, ha="right",
                         va="bottom", fontsize=7, color="crimson")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out


def write_page(summary: Path, jobs: Path, out: Path, grid_name: str = "", tracking_uri: Optional[str] = None,
               tables: Optional[list] = None, plots: Optional[list] = None) -> Path:
    import pandas as pd

    j = pd.read_csv(jobs, keep_default_na=False, na_values=[""])
    out = Path(out)
    base = out.parent
    rel = lambda p: os.path.relpath(Path(p), base)  # noqa: E731
    n, n_failed = len(j), int((~j.status.isin(["ok", NOT_APPLICABLE])).sum())
    n_na = int((j.status == NOT_APPLICABLE).sum())
    lines = [f"# REx benchmark report (grid `{grid_name}`)", "",
             f"{n} jobs, {n - n_failed - n_na} ok, {n_failed} failed"
             + (f", {n_na} n/a (the method does not apply to the model)" if n_na else "")
             + f". Source of truth: the job folders under `{rel(base / 'runs')}/`; "
             f"summary: [{rel(summary)}]({rel(summary)}) (one row per job and metric), [{rel(jobs)}]({rel(jobs)}) (one row per job).", ""]
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
    failed = j[~j.status.isin(["ok", NOT_APPLICABLE])]
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
