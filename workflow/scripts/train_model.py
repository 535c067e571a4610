"""Produce <out>/model.pt + metrics.json for a Fashion-MNIST model (the Snakemake rule train_model).

    python workflow/scripts/train_model.py --model resnet20_fmnist --out results/models/resnet20_fmnist \
        --threads 2 [--reuse-cache] -- [python -m rex.train arguments, e.g. --epochs 1]

Runs ``python -m rex.train --model M --out OUT --threads T <args>`` in this process (so that the job is one
process, Snakemake's direct child, and dies with it). With ``--reuse-cache``, a checkpoint in
``rex.paths.cache_root()/models/<model>/`` is copied instead of retraining only if it was trained with the same
FULL recipe (``rex.train.full_recipe``: every training argument resolved -- epochs, batch size, learning rate,
optimizer, weight decay, warm-up, seed, training/test-set sizes, augmentation, threads, training-code version
-- compared by its sha256 ``recipe_hash``) and its sha256 matches its metrics.json: training is deterministic
for a full recipe, so the copy is the checkpoint training would write, minus the wait.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rex.io import atomic_copy  # standard library only: `--help` and argument errors need no torch


def requested(model: str, threads: int, train_args: list):
    """The full recipe `python -m rex.train` would train for these arguments (None if they do not parse: then
    training runs and reports the error)."""
    import contextlib
    import io

    from rex.train import recipe_of_argv

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # training repeats argparse's message
            return recipe_of_argv(["--model", model, "--threads", str(threads), *train_args])
    except SystemExit:
        return None


def recorded_recipe(model: str, m: dict):
    """The full recipe a cached checkpoint was trained with: its recorded `full_recipe`, or, for checkpoints
    written before it was recorded, rebuilt from the fields every metrics.json holds."""
    from rex.train import RECIPES, full_recipe

    if m.get("full_recipe"):
        return m["full_recipe"]
    try:
        r = m["recipe"]
        return full_recipe(model, seed=m["seed"], limit=m["n_train"], test_limit=m["n_test"], augment=m["augment"],
                           threads=m["threads"], **{k: r[k] for k in RECIPES[model]})
    except (KeyError, TypeError):
        return None


def cached_match(model: str, want):
    from rex.models import checkpoint_dir, checkpoint_ok
    from rex.train import recipe_hash

    d = checkpoint_dir(model)
    if not want or not checkpoint_ok(model, d):
        return None
    have = recorded_recipe(model, json.loads((d / "metrics.json").read_text()))
    if have is None or recipe_hash(have) != recipe_hash(want):
        diff = sorted(k for k in want if (have or {}).get(k) != want[k])
        print(f"not reusing the cached checkpoint {d}: trained with another recipe (differs in {', '.join(diff)})")
        return None
    return d


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
        src = cached_match(a.model, requested(a.model, a.threads, extra))
        if src is not None:
            # metrics.json first, model.pt last: model.pt is the rule's main output
            atomic_copy(src / "metrics.json", out / "metrics.json")
            atomic_copy(src / "model.pt", out / "model.pt")
            print(f"reused the cached checkpoint {src} (same full recipe, sha256 verified)")
            return 0
    from rex.train import main as train_main

    args = ["--model", a.model, "--out", str(out), "--threads", str(a.threads), *extra]
    print("+ python -m rex.train", shlex.join(args), flush=True)
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
