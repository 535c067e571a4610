"""Weight-only rows on the two text models, written to a CSV (one line per row, rewritten after each row).

    PYTHONPATH=. OMP_NUM_THREADS=1 python workflow/scripts/text_rows.py --model minilm_l6 \
        --out results/text_rows_minilm_l6.csv
    PYTHONPATH=. OMP_NUM_THREADS=1 python workflow/scripts/text_rows.py --model smollm2_135m \
        --out results/text_rows_smollm2_135m.csv --tokens 2048 --window 512

Rows (defaults, `--rows` to choose): the float reference; REx (per-channel symmetric RTN grid, the same
for K = 1, i.e. plain RTN) at W3/W2 (MiniLM) or W4/W3 (SmolLM2) with K = 1..3; HQQ (the `hqq` package)
per channel and with groups of 64 at the same bits. Weight-only (abits=None): activations float. Every
nn.Linear is quantized (first_last=same, the policy of ../shared/data/README.md's figures; `--first-last`
to change), embeddings stay float, and so does an LM head tied to the embedding (SmolLM2's: its matrix is
the embedding; `--tied-head quantize` to quantize it as a separate copy). Measured: SmolLM2 W4 RTN 60.99
with the tied head float (the README's figure), 88.5 with it at W4, 60.82 with first_last=8bit.

Metrics: MiniLM, Spearman x100 of the cosine similarity of mean-pooled, L2-normalised embeddings on GLUE
STS-B dev (`--pairs`, default all 1,500); SmolLM2, perplexity over non-overlapping windows of WikiText-2 raw
test (`--window`, `--tokens`: 2,048 tokens = 4 windows of 512 by default). SmolLM2's float reference is the
Q4_1 GGUF file dequantized to float32, not the original BF16 release: the `note` column says so on every row.
`bits_per_weight`: code bits x K plus one 32-bit float scale per output row and order (REx / RTN), or
HQQ's 16-bit scale and zero point per group, averaged over the quantized weights.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOLLM2_NOTE = "reference = SmolLM2-135M-Instruct Q4_1 GGUF dequantized to float32, not the BF16 release"
DEFAULT_ROWS = {
    "minilm_l6": ["fp32", "rex:3:1", "rex:3:2", "rex:3:3", "rex:2:1", "rex:2:2", "rex:2:3", "hqq:3", "hqq:3:g64"],
    "smollm2_135m": ["fp32", "rex:4:1", "rex:4:2", "rex:4:3", "rex:3:1", "rex:3:2", "rex:3:3",
                     "hqq:4", "hqq:4:g64", "hqq:3", "hqq:3:g64"],
}
COLUMNS = ["model", "dataset", "task", "row", "method", "wbits", "abits", "order", "group_size", "first_last",
           "metric", "value", "fp32_value", "delta", "pairs", "windows", "window", "tokens", "predictions",
           "bits_per_weight", "tied_head", "linears_quantized", "linears_total", "quant_s", "eval_s", "threads", "note"]


def parse_row(text: str) -> dict:
    """'fp32', 'rex:<wbits>:<K>', 'hqq:<wbits>[:g<group>]'."""
    parts = text.split(":")
    if parts == ["fp32"]:
        return dict(method="fp32", wbits=32, order=1, group_size=None)
    try:
        if parts[0] == "rex" and len(parts) == 3:
            return dict(method="rex", wbits=int(parts[1]), order=int(parts[2]), group_size=None)
        if parts[0] == "hqq" and len(parts) in (2, 3):
            g = None
            if len(parts) == 3:
                if not parts[2].startswith("g"):
                    raise ValueError
                g = int(parts[2][1:])
            return dict(method="hqq", wbits=int(parts[1]), order=1, group_size=g)
    except ValueError:
        pass
    raise SystemExit(f"bad row {text!r}: use fp32, rex:<wbits>:<K> or hqq:<wbits>[:g<group>]")


def rex_bits_per_weight(model, wbits: int, order: int) -> float:
    from torch import nn

    from rex.nn import QuantLayer

    num = den = 0.0
    for m in model.modules():
        if isinstance(m, QuantLayer) and isinstance(m.inner, nn.Linear):
            n_out, n_in = m.inner.weight.shape
            num += n_out * n_in * (m.wbits * m.order) + n_out * 32 * m.order
            den += n_out * n_in
    return num / den if den else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(DEFAULT_ROWS))
    ap.add_argument("--out", required=True, help="CSV path (e.g. results/text_rows_<model>.csv)")
    ap.add_argument("--rows", nargs="*", default=None, help="fp32 rex:W:K hqq:W[:gG] (default: the model's set)")
    ap.add_argument("--pairs", type=int, default=None, help="STS-B: the first N of 1,500 pairs (default all)")
    ap.add_argument("--tokens", type=int, default=2048, help="WikiText-2: tokens scored (default 2,048)")
    ap.add_argument("--window", type=int, default=512, help="WikiText-2: window length (default 512)")
    ap.add_argument("--first-last", default="same", choices=("same", "8bit", "fp"))
    ap.add_argument("--tied-head", default="float", choices=("float", "quantize"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (same model) and run only the missing ones")
    args = ap.parse_args(argv)

    import torch

    import rex
    from rex.data import get_dataset
    from rex.evaluate.text import evaluate_text
    from rex.io import atomic_write_text
    from rex.models import get_model
    from rex.models.transformers import load_tokenizer, quantize_text_model, tied_linears, weight_linears
    from rex.nn import QuantLayer

    torch.set_num_threads(args.threads)
    bundle = get_model(args.model)
    task = bundle.entry.task
    tok = load_tokenizer(bundle)
    if task == "text_similarity":
        dataset = get_dataset("stsb_dev", limit=args.pairs)
    else:
        dataset = get_dataset("wikitext2_test", limit=args.tokens)
        dataset.window = args.window
    note = SMOLLM2_NOTE if args.model == "smollm2_135m" else ""
    total = len(weight_linears(bundle.model))
    rows, fp32_value = [], None
    out = Path(args.out)
    wanted = args.rows or DEFAULT_ROWS[args.model]
    if args.resume and out.is_file():
        with out.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["model"] == args.model and r["row"] in wanted]
        fp32_value = next((float(r["value"]) for r in rows if r["method"] == "fp32"), None)
        if fp32_value is None and "fp32" in wanted:  # the float row first: the others' delta needs it
            wanted = ["fp32"] + [w for w in wanted if w != "fp32"]
    done = {r["row"] for r in rows}
    for text in wanted:
        if text in done:
            continue
        r = parse_row(text)
        t0 = time.perf_counter()
        if r["method"] == "fp32":
            model, bpw, nq = bundle.model, 32.0, 0
        else:
            opts = {"group_size": r["group_size"]} if r["method"] == "hqq" else {}
            spec = rex.QuantSpec(method=r["method"], wbits=r["wbits"], abits=None, order=r["order"],
                                 first_last=args.first_last, options=opts)
            model = quantize_text_model(bundle, spec, tied_head=args.tied_head)
            if r["method"] == "hqq":  # rex.cost.weight_memory, recounted once the tied head went back to float
                bpw = model.rex_info.extra["memory"]["bits_per_weight"]
            else:
                bpw = rex_bits_per_weight(model, r["wbits"], r["order"])
            nq = sum(isinstance(m, QuantLayer) for m in model.modules())
        quant_s = time.perf_counter() - t0
        ev = evaluate_text(model, dataset, tok, task, threads=args.threads)
        if r["method"] == "fp32":
            fp32_value = ev["value"]
        lm = task == "language_modeling"
        rows.append(dict(
            model=args.model, dataset=getattr(dataset, "name", ""), task=task, row=text, method=r["method"],
            wbits=r["wbits"], abits="float", order=r["order"], group_size=r["group_size"] or "",
            first_last=args.first_last if r["method"] != "fp32" else "", metric=ev["metric"],
            value=round(ev["value"], 4), fp32_value="" if fp32_value is None else round(fp32_value, 4),
            delta="" if fp32_value is None else round(ev["value"] - fp32_value, 4),
            pairs="" if lm else ev["n"], windows=ev["n"] if lm else "", window=ev.get("window", ""),
            tokens=ev.get("tokens", ""), predictions=ev.get("n_tokens", ""), bits_per_weight=round(bpw, 4),
            tied_head=args.tied_head if tied_linears(bundle.model) else "",
            linears_quantized=nq, linears_total=total, quant_s=round(quant_s, 2), eval_s=round(ev["seconds"], 1),
            threads=args.threads, note=note))
        print(f"{args.model} {text:>10}: {ev['metric']} {ev['value']:.2f}  ({bpw:.3f} bits/weight, "
              f"quant {quant_s:.1f}s, eval {ev['seconds']:.0f}s)", flush=True)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out, buf.getvalue())
    print(f"wrote {out} ({len(rows)} rows; torch {torch.__version__}, {platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
