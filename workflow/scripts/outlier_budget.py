"""Does a sparse extra residual tame a language model's outlier weights? (issue 14 item 4)

    PYTHONPATH=. OMP_NUM_THREADS=1 python workflow/scripts/outlier_budget.py --out results/outlier_budget.json

REx's final paper says that an extra residual order kept for a few neurons only is enough where plain low-bit
quantization breaks on outlier weights. This script asks the question of SmolLM2-135M (weight-only, per channel,
every nn.Linear at the same bits, embeddings and the tied head float: the setting of the text rows) at W3 and W4:
K = 2 at fractional budgets 1.1 .. 1.5 (uniform: the same density in every layer, the paper's; greedy: error
reduction per BOP, ours), against K = 1 (RTN) and the dense K = 2.

For each row it records perplexity (WikiText-2 raw test, fixed non-overlapping windows: the window and the token
count are in the file) and bits per weight, and, for the greedy allocation, **what it picks**:

- the density of the second order per layer kind (q/k/v/o projections, gate/up/down MLP) and per block;
- whether the neurons it keeps are the outlier rows: the share of the model's top-1 % rows by outlier ratio
  (max |w| / rms of the row, the heavy-tail measure) that received the second order, against the share of all
  rows that did (if selection ignored outliers, both shares would be equal);
- the residual error (max over the row of |W - R1 - R2 m|) of those outlier rows after quantization.

The float reference is the Q4_1 GGUF file dequantized to float32 (not the BF16 release); every row says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOTE = "reference = SmolLM2-135M-Instruct Q4_1 GGUF dequantized to float32, not the BF16 release"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_kind(name: str) -> str:
    return next((k for k in KINDS if name.endswith(k)), "other")


def outlier_ratio(w):
    """max |w| / rms(w) per output row: about 3-4 for a Gaussian row of a few hundred weights, far more for a row
    holding an outlier weight."""
    import torch

    w = w.detach().float()
    return w.abs().amax(1) / w.pow(2).mean(1).sqrt().clamp_min(1e-12)


def selection_stats(qmodel, float_linears: dict, top: float = 0.01) -> dict:
    """What the allocation picked: per-kind and per-block densities of order 2, and its outlier coverage."""
    import torch

    from rex.nn import QuantLayer

    per_kind, per_block, ratios, picked = {}, {}, [], []
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantLayer) or m.order < 2 or name not in float_linears:
            continue
        mask = getattr(m, "m1", None)  # order 2 (index 1): one flag per output row
        rows = float_linears[name].weight.shape[0]
        sel = torch.ones(rows, dtype=torch.bool) if mask is None else mask.reshape(rows, -1).any(1).cpu()
        kind = layer_kind(name)
        blk = re.search(r"layers\.(\d+)\.", name)
        for table, key in ((per_kind, kind), (per_block, int(blk.group(1)) if blk else -1)):
            n, k = table.get(key, (0, 0))
            table[key] = (n + rows, k + int(sel.sum()))
        ratios.append(outlier_ratio(float_linears[name].weight))
        picked.append(sel)
    if not ratios:
        return {}
    r, s = torch.cat(ratios), torch.cat(picked)
    thr = torch.quantile(r, 1 - top)
    top_rows = r >= thr
    return dict(
        density_by_kind={k: round(b / a, 4) for k, (a, b) in sorted(per_kind.items())},
        density_by_block={str(k): round(b / a, 4) for k, (a, b) in sorted(per_block.items())},
        rows=int(r.numel()), rows_with_order2=int(s.sum()),
        share_all_rows=round(float(s.float().mean()), 4),
        share_top_outlier_rows=round(float(s[top_rows].float().mean()), 4),
        outlier_threshold=round(float(thr), 3), top_fraction=top,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/outlier_budget.json")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--budgets", default="1.1,1.25,1.5")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    import rex
    from rex.data import get_dataset
    from rex.evaluate.text import evaluate_text
    from rex.io import atomic_write_json
    from rex.models import get_model
    from rex.models.transformers import load_tokenizer, quantize_text_model, weight_linears

    torch.set_num_threads(args.threads)
    bundle = get_model("smollm2_135m")
    tok = load_tokenizer(bundle)
    ds = get_dataset("wikitext2_test", limit=args.tokens)
    ds.window = args.window
    linears = weight_linears(bundle.model)
    rows = []
    t0 = time.perf_counter()
    ref = evaluate_text(bundle.model, ds, tok, "language_modeling", threads=args.threads)
    rows.append(dict(row="reference", perplexity=round(ref["value"], 3), bits_per_weight=32.0))
    print(f"reference: {ref['value']:.2f}", flush=True)
    settings = []
    for w in (int(b) for b in args.bits.split(",")):
        settings += [(w, 1, None, "uniform"), (w, 2, None, "uniform")]
        for b in (float(x) for x in args.budgets.split(",")):
            settings += [(w, 2, b, "uniform"), (w, 2, b, "greedy")]
    for w, k, b, alloc in settings:
        spec = rex.QuantSpec(method="rex", wbits=w, abits=None, order=k, budget=b, allocation=alloc,
                             first_last="same")
        t1 = time.perf_counter()
        q = quantize_text_model(bundle, spec)
        mem = q.rex_info.extra.get("memory", {})
        ev = evaluate_text(q, ds, tok, "language_modeling", threads=args.threads)
        row = dict(row=spec.label(), wbits=w, order=k, budget=b, allocation=alloc, perplexity=round(ev["value"], 3),
                   bits_per_weight=mem.get("bits_per_weight_no_embeddings", mem.get("bits_per_weight")),
                   seconds=round(time.perf_counter() - t1, 1))
        if k > 1 and b is not None:
            row.update(selection_stats(q, linears))
        rows.append(row)
        print(f"{row['row']}: ppl {row['perplexity']:.2f}  bits/weight {row['bits_per_weight']}  "
              f"outlier-row share {row.get('share_top_outlier_rows', '-')} vs all-row share "
              f"{row.get('share_all_rows', '-')}", flush=True)
    out = Path(args.out)
    atomic_write_json(out, dict(model="smollm2_135m", note=NOTE, dataset="wikitext2_test", window=args.window,
                                tokens=ref.get("tokens"), predictions=ref.get("n_tokens"), threads=args.threads,
                                torch=torch.__version__, machine=platform.machine(),
                                seconds=round(time.perf_counter() - t0, 1), rows=rows), indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
