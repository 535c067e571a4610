"""The job label, ``method=rex,w=4,a=8,K=2,budget=1.5``: a result folder's name, built in this one place.

Standard library only, so that the workflow (``rex.pipeline.grid``, imported while Snakemake builds the DAG)
and the library (``QuantSpec.label``) share it without the workflow importing torch.
"""
from __future__ import annotations

from typing import Optional

FLOAT_BITS = 32
FP32_METHOD = "fp32"
# What a label looks like (the Snakemake wildcard constraint; ``rex.pipeline.grid`` checks every label with it).
LABEL_RE = r"method=[A-Za-z0-9_]+,w=\d+,a=\d+,K=\d+(,budget=[0-9.e+]+(,alloc=[a-z_]+)?)?"


def label(method: str, wbits: int, abits: Optional[int], order: int = 1, budget: Optional[float] = None,
          allocation: str = "uniform") -> str:
    """The job's folder name; ``abits`` None (or 32) is float activations. Defined for FP32 too."""
    a = FLOAT_BITS if abits in (None, FLOAT_BITS) else int(abits)
    parts = [f"method={method}", f"w={int(wbits)}", f"a={a}", f"K={int(order)}"]
    if budget is not None:
        parts.append(f"budget={float(budget):g}")
        if allocation != "uniform":
            parts.append(f"alloc={allocation}")
    return ",".join(parts)


def fp32_label() -> str:
    return label(FP32_METHOD, FLOAT_BITS, FLOAT_BITS, 1)


def parse_label(text: str) -> dict:
    """Inverse of :func:`label` (``method=rex,w=4,a=8,K=2,budget=1.5`` -> dict)."""
    kv = dict(part.split("=", 1) for part in text.split(","))
    return {
        "method": kv["method"], "wbits": int(kv["w"]), "abits": int(kv["a"]), "order": int(kv["K"]),
        "budget": float(kv["budget"]) if "budget" in kv else None, "allocation": kv.get("alloc", "uniform"),
    }
