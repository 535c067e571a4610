"""Train the small Fashion-MNIST models (seeded, deterministic, CPU).

    python -m rex.train --model resnet20_fmnist --epochs 4 --seed 0 [--out DIR] [--threads 2]

Writes `model.pt` (a plain state_dict) and `metrics.json` (test accuracy, seed, epochs, sha256 of
model.pt, timings, recipe) into `--out` (default `rex.paths.cache_root()/models/<name>/`, where
`rex.models.get_model` looks), each atomically (``rex.io``). ``ensure_trained`` trains only when no valid
checkpoint is there.

Data: the 60,000 Fashion-MNIST training images held in memory as uint8 and batched without worker
processes; light augmentation (random crop with 2-pixel zero padding, horizontal flip) drawn from a
seeded generator. Optimiser: SGD (Nesterov momentum 0.9), Adam or AdamW (decoupled weight decay, the usual
ViT/DeiT choice), linear warm-up then cosine decay per step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, load_arrays
from .errors import ConfigError, RexError, UnknownNameError
from .io import atomic_torch_save, atomic_write_json, sha256_file
from .models import checkpoint_dir, checkpoint_ok
from .models.small import BUILDERS

# Default recipes. Measured (seed 0, 2 threads, torch 2.14.1): resnet20_fmnist 3 epochs -> 91.45 % test
# (~80 s/epoch on 2 idle cores, ~4 CPU-min in all); mobilenetv2_fmnist 3 epochs -> 90.45 %. Wall time
# grows several-fold on a loaded machine (it took 31 / 71 min here with load ~8 on 2 cores).
RECIPES = {
    "resnet20_fmnist": dict(epochs=3, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-4),
    "mobilenetv2_fmnist": dict(epochs=3, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=4e-5),
    # DeiT-style recipe (AdamW, decoupled weight decay 0.05, warm-up + cosine): see rex/models/vit.py.
    # Measured (seed 0, 2 threads, load ~8): 83.09 % test, 863 s wall / 1,582 CPU-s
    "vit_fmnist": dict(epochs=6, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=0.05),
}
SMOKE = dict(epochs=1, limit=512, test_limit=500)
OPTIMIZERS = ("sgd", "adam", "adamw")


# Bump when the training code changes what a recipe produces (augmentation, schedule, optimiser details):
# a cached checkpoint is reused only for the same full recipe, this version included.
RECIPE_VERSION = 1
N_TRAIN, N_TEST = 60000, 10000


def _overridden(name: str, **overrides) -> dict:
    """The model's recipe (``RECIPES``) with the given non-None settings replacing its defaults."""
    if name not in RECIPES:
        raise UnknownNameError("trainable model", name, RECIPES)
    return {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}


def full_recipe(name: str, *, epochs: Optional[int] = None, seed: int = 0, batch_size: Optional[int] = None,
                lr: Optional[float] = None, optimizer: Optional[str] = None, weight_decay: Optional[float] = None,
                threads: Optional[int] = None, limit: Optional[int] = None, test_limit: Optional[int] = None,
                augment: bool = True) -> dict:
    """Every setting that decides the trained weights, resolved (defaults filled in): the identity of a
    checkpoint. The thread count is part of it (float reductions differ: another checkpoint)."""
    r = _overridden(name, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                    weight_decay=weight_decay)
    n_train = min(int(limit), N_TRAIN) if limit else N_TRAIN
    return {"version": RECIPE_VERSION, "model": name, "epochs": int(r["epochs"]), "batch_size": int(r["batch_size"]),
            "lr": float(r["lr"]), "optimizer": r["optimizer"], "weight_decay": float(r["weight_decay"]),
            "momentum": 0.9 if r["optimizer"] == "sgd" else None,
            "warmup_steps": min(math.ceil(n_train / max(1, int(r["batch_size"]))) // 2, 200) or 1,
            "schedule": "linear-warmup-cosine", "seed": int(seed), "n_train": n_train,
            "n_test": min(int(test_limit), N_TEST) if test_limit else N_TEST, "augment": bool(augment),
            "threads": int(threads) if threads else None}


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip on a uint8 batch (B, 1, H, W)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    bidx = torch.arange(b)[:, None, None]
    out = torch.stack([padded[bidx, ch, rows, cols] for ch in range(c)], dim=1)
    return out


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * t))


def train(name: str, *, epochs: Optional[int] = None, seed: int = 0, out: Optional[os.PathLike] = None,
          batch_size: Optional[int] = None, lr: Optional[float] = None, optimizer: Optional[str] = None,
          weight_decay: Optional[float] = None, threads: Optional[int] = None, limit: Optional[int] = None,
          test_limit: Optional[int] = None, augment: bool = True, eval_each_epoch: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train `name` on Fashion-MNIST train, evaluate on test, write model.pt + metrics.json; return metrics."""
    recipe = _overridden(name, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         weight_decay=weight_decay)
    if recipe["epochs"] < 1 or recipe["batch_size"] < 1 or recipe["lr"] <= 0:
        raise ConfigError(f"bad training recipe {recipe}")
    if recipe["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {recipe['optimizer']!r}")
    out_dir = Path(out) if out is not None else checkpoint_dir(name)

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        random.seed(seed)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        x_train, y_train = load_arrays("train")
        x_test, y_test = load_arrays("test")
        if limit:
            x_train, y_train = x_train[:limit], y_train[:limit]
        if test_limit:
            x_test, y_test = x_test[:test_limit], y_test[:test_limit]
        mean = torch.tensor(FMNIST_MEAN).view(1, -1, 1, 1)
        std = torch.tensor(FMNIST_STD).view(1, -1, 1, 1)

        def norm(x: torch.Tensor) -> torch.Tensor:
            return (x.float().div_(255.0) - mean).div_(std)

        model = BUILDERS[name]()
        model.to(memory_format=torch.channels_last)
        decay, no_decay = [], []
        for pname, p in model.named_parameters():
            (no_decay if p.dim() <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": recipe["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        if recipe["optimizer"] == "sgd":
            opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
        elif recipe["optimizer"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=recipe["lr"])
        else:
            opt = torch.optim.Adam(groups, lr=recipe["lr"])
        n = len(x_train)
        bs = recipe["batch_size"]
        steps_per_epoch = math.ceil(n / bs)
        total = steps_per_epoch * recipe["epochs"]
        warmup = min(steps_per_epoch // 2, 200) or 1
        loss_fn = nn.CrossEntropyLoss()

        def evaluate_test() -> float:
            model.eval()
            correct = 0
            with torch.inference_mode():
                for i in range(0, len(x_test), 500):
                    xb = norm(x_test[i:i + 500]).contiguous(memory_format=torch.channels_last)
                    correct += int((model(xb).argmax(1) == y_test[i:i + 500]).sum())
            model.train()
            return 100.0 * correct / len(x_test)

        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        show = progress and tqdm is not None and sys.stderr.isatty()
        history = []
        step = 0
        t0 = time.perf_counter()
        c0 = time.process_time()
        model.train()
        for epoch in range(recipe["epochs"]):
            te = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            seen = correct = 0
            loss_sum = 0.0
            batches = range(steps_per_epoch)
            bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{recipe['epochs']}", leave=False) if show else batches
            for bi in bar:
                idx = perm[bi * bs:(bi + 1) * bs]
                xb = x_train[idx]
                if augment:
                    xb = _augment(xb, 2, gen)
                xb = norm(xb).contiguous(memory_format=torch.channels_last)
                yb = y_train[idx]
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, recipe["lr"], warmup)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.detach().argmax(1) == yb).sum())
                seen += len(yb)
                if show and bi % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
            rec = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5),
                   "train_acc": round(100.0 * correct / seen, 3),
                   "seconds": round(time.perf_counter() - te, 1)}
            if eval_each_epoch and epoch + 1 < recipe["epochs"]:
                rec["test_acc"] = round(evaluate_test(), 3)
            history.append(rec)
            log(f"[{name}] epoch {epoch + 1}/{recipe['epochs']}: " + ", ".join(f"{k}={v}" for k, v in rec.items()
                                                                               if k != "epoch"))
        train_seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        test_acc = evaluate_test()
        history[-1]["test_acc"] = round(test_acc, 3)
        model.eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}

        model_path = out_dir / "model.pt"
        atomic_torch_save(state, model_path)
        full = full_recipe(name, seed=seed, limit=limit, test_limit=test_limit, augment=augment,
                           threads=torch.get_num_threads(), **{k: recipe[k] for k in RECIPES[name]})
        metrics = {
            "model": name,
            "test_accuracy": round(test_acc, 3),
            "n_test": len(x_test),
            "n_train": n,
            "seed": seed,
            "epochs": recipe["epochs"],
            "recipe": recipe,
            "augment": augment,
            "full_recipe": full,
            "recipe_hash": recipe_hash(full),  # workflow/scripts/train_model.py reuses a cache on this only
            "smoke": bool(limit or test_limit),
            "train_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),  # all threads; wall time depends on machine load
            "threads": torch.get_num_threads(),
            "sha256": sha256_file(model_path),
            "num_params": sum(p.numel() for p in model.parameters()),
            "history": history,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(out_dir / "metrics.json", metrics, indent=2)
        log(f"[{name}] test accuracy {test_acc:.2f}% (n={len(x_test)}), trained in {train_seconds:.0f} s "
            f"on {torch.get_num_threads()} thread(s); wrote {model_path}")
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def ensure_trained(name: str, out: Optional[os.PathLike] = None, **train_kw: Any) -> Path:
    """Train `name` (default recipe, or `train_kw` for `train`) unless a valid checkpoint exists.

    Returns the checkpoint folder. Concurrent callers are serialised with a file lock.
    """
    if name not in RECIPES:
        raise UnknownNameError("trainable model", name, RECIPES)
    d = Path(out) if out is not None else checkpoint_dir(name)
    if checkpoint_ok(name, d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover
        FileLock = None  # type: ignore[assignment]
    if FileLock is None:
        train(name, out=d, **train_kw)
        return d
    with FileLock(str(d / ".train.lock")):
        if not checkpoint_ok(name, d):
            train(name, out=d, **train_kw)
    return d


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rex.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help=f"one of {', '.join(sorted(RECIPES))}")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: cache_root()/models/<model>)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--eval-each-epoch", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny run for tests ({SMOKE}); never use its checkpoint for results")
    return ap


def _size_args(args: argparse.Namespace) -> dict:
    kw = dict(epochs=args.epochs, limit=args.limit, test_limit=args.test_limit)
    if args.smoke:
        kw = {k: (v if v is not None else SMOKE[k]) for k, v in kw.items()}
    return kw


def recipe_of_argv(argv: list) -> dict:
    """The full recipe (see `full_recipe`) that `python -m rex.train <argv>` would train; argparse errors exit 2."""
    args = build_parser().parse_args(argv)
    return full_recipe(args.model, seed=args.seed, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, threads=args.threads, augment=not args.no_augment,
                       **_size_args(args))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import keep_freed_memory

    keep_freed_memory()  # large activations reuse the heap instead of fresh pages per layer (rex.runtime)
    kw = _size_args(args)
    try:
        train(args.model, seed=args.seed, out=args.out, batch_size=args.batch_size, lr=args.lr,
              optimizer=args.optimizer, weight_decay=args.weight_decay, threads=args.threads,
              augment=not args.no_augment, eval_each_epoch=args.eval_each_epoch, **kw)
    except RexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
