"""Produce <out>/model.pt + metrics.json for a Fashion-MNIST model (the Snakemake rule train_model).

    python workflow/scripts/train_model.py --model resnet20_fmnist --out results/models/resnet20_fmnist \
        --threads 2 [--reuse-cache] -- [python -m rex.train arguments, e.g. --epochs 1]

Runs ``python -m rex.train --model M --out OUT --threads T <args>``. With ``--reuse-cache``, a checkpoint in
``rex.paths.cache_root()/models/<model>/`` made with the same recipe (model, epochs, seed, training-set size,
test-set size, augmentation; its sha256 checked against its metrics.json) is copied instead of retraining:
training is deterministic for a recipe, so the copy is the checkpoint training would write, minus the wait.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rex.io import atomic_copy  # standard library only: `--help` and argument errors need no torch


def requested(model: str, train_args: list) -> dict:
    """The recipe `python -m rex.train` would use for these arguments."""
    from rex.train import RECIPES, SMOKE

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    a, unknown = p.parse_known_args(train_args)
    if unknown:  # other recipe knobs (lr, batch size, ...): do not try to match, train
        return {}
    limit, test_limit, epochs = a.limit, a.test_limit, a.epochs
    if a.smoke:
        limit = limit or SMOKE["limit"]
        test_limit = test_limit or SMOKE["test_limit"]
        epochs = epochs or SMOKE["epochs"]
    return {"model": model, "epochs": epochs or RECIPES[model]["epochs"], "seed": a.seed,
            "n_train": limit or 60000, "n_test": test_limit or 10000, "augment": not a.no_augment}


def cached_match(model: str, want: dict):
    from rex.models import checkpoint_dir, checkpoint_ok

    d = checkpoint_dir(model)
    if not want or not checkpoint_ok(model, d):
        return None
    m = json.loads((d / "metrics.json").read_text())
    have = {k: m.get(k) for k in want}
    return d if have == want else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-cache", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.reuse_cache:
        src = cached_match(a.model, requested(a.model, extra))
        if src is not None:
            # metrics.json first, model.pt last: model.pt is the rule's main output
            atomic_copy(src / "metrics.json", out / "metrics.json")
            atomic_copy(src / "model.pt", out / "model.pt")
            print(f"reused the identical cached checkpoint {src} (same recipe, sha256 verified)")
            return 0
    cmd = [sys.executable, "-m", "rex.train", "--model", a.model, "--out", str(out), "--threads", str(a.threads),
           *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
