"""Published reference numbers (docs/method.md §7): ``rex.reference.load_published()``.

The numbers are other people's, with their own protocol (weights, full ImageNet val, their quantizer);
every entry says so (``status: published``) and names its source. They are never mixed with measured rows
without that label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PUBLISHED = Path(__file__).with_name("published.yaml")
REQUIRED = ("method", "model", "dataset", "wbits", "abits", "top1", "protocol", "source", "status")


def load_published(method: Optional[str] = None, model: Optional[str] = None, path=None) -> list[dict]:
    """The published entries, optionally filtered by method and model. Each is a dict with at least
    method, model, dataset, wbits, abits, top1, protocol, source and status ('published')."""
    import yaml

    from ..errors import ConfigError

    p = Path(path) if path is not None else PUBLISHED
    data = yaml.safe_load(p.read_text())
    entries = data.get("entries", []) if isinstance(data, dict) else []
    for i, e in enumerate(entries):
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            raise ConfigError(f"{p}: entry {i} misses {', '.join(missing)}")
        if e["status"] != "published":
            raise ConfigError(f"{p}: entry {i} has status {e['status']!r}; this file holds published numbers only")
    return [dict(e) for e in entries
            if (method is None or e["method"] == method) and (model is None or e["model"] == model)]
