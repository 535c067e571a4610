"""Text evaluators: STS-B (Spearman x100 of embedding cosine similarity) and causal-LM perplexity.

    r = evaluate_sts(model, get_dataset("stsb_dev", limit=500), tokenizer)   # {"spearman": 86.x, ...}
    r = evaluate_perplexity(lm, get_dataset("wikitext2_test"), tokenizer)     # {"perplexity": 30.2, ...}

`model` is any nn.Module called like the Hugging Face model (keyword inputs, an output with
`last_hidden_state` / `logits`, a tuple, dict or tensor): the float model or a copy from `rex.quantize`.
`tokenizer` is a Hugging Face tokenizer, or a model bundle/entry (`rex.models.transformers.load_tokenizer`).
Deterministic: fixed order, no sampling, inference mode.
"""
from __future__ import annotations

import math
import time
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .classification import _num_threads

__all__ = ["evaluate_sts", "evaluate_perplexity", "evaluate_text", "spearman", "rankdata", "mean_pool", "embed"]


def _tokenizer(tokenizer: Any):
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed: pass tokenizer= (a Hugging Face tokenizer or the model bundle)")
    from ..models import ModelBundle, ModelEntry
    from ..models.transformers import load_tokenizer

    if not isinstance(tokenizer, (ModelBundle, ModelEntry)):
        return tokenizer

    return load_tokenizer(tokenizer)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and xs[end + 1] == xs[start]:
            end += 1
        ranks[order[start:end + 1]] = 0.5 * (start + end) + 1.0
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of average ranks)."""
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _hidden(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("last_hidden_state", "hidden_states"):
        v = getattr(output, key, None)
        if v is None and isinstance(output, dict):
            v = output.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"cannot find the token embeddings (last_hidden_state) in a {type(output).__name__}")


def _logits(output: Any) -> torch.Tensor:
    from .classification import logits_of

    return logits_of(output)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings over the real (mask = 1) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model: nn.Module, sentences: List[str], tokenizer: Any, batch_size: int = 64,
          max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings [n, d]. Sentences are batched by length (less padding; the
    attention mask makes the result independent of the batching) and returned in the input order."""
    tok = _tokenizer(tokenizer)
    lengths = [len(tok(s, truncation=True, max_length=max_length)["input_ids"]) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    out: List[Optional[torch.Tensor]] = [None] * len(sentences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = _hidden(model(**inputs)).float()
        e = F.normalize(mean_pool(h, inputs["attention_mask"]), dim=-1)
        for j, i in enumerate(idx):
            out[i] = e[j]
    return torch.stack(out)  # type: ignore[arg-type]


def evaluate_sts(model: nn.Module, dataset: Any, tokenizer: Any = None, batch_size: int = 64,
                 max_length: int = 128, threads: Optional[int] = None, progress: bool = False,
                 desc: Optional[str] = None) -> dict:
    """STS-B: Spearman x100 between gold scores and the cosine similarity of the pair's embeddings.

    Returns dict(metric="spearman", spearman, n (pairs), sentences, max_length, seconds)."""
    if isinstance(dataset, str):
        from ..data import get_dataset

        dataset = get_dataset(dataset)
    pairs = [dataset[i] for i in range(len(dataset))]
    if not pairs:
        raise ConfigError("the STS dataset is empty")
    t0 = time.perf_counter()
    model.eval()
    uniq = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    with _num_threads(threads):
        e = embed(model, uniq, tokenizer, batch_size=batch_size, max_length=max_length)
    pos = {s: i for i, s in enumerate(uniq)}
    ea = e[[pos[a] for a, _, _ in pairs]]
    eb = e[[pos[b] for _, b, _ in pairs]]
    cos = (ea * eb).sum(-1).double().numpy()
    gold = np.array([p[2] for p in pairs], dtype=np.float64)
    rho = spearman(gold, cos)
    return dict(metric="spearman", spearman=100.0 * rho, n=len(pairs), sentences=len(uniq),
                max_length=max_length, seconds=time.perf_counter() - t0)


@torch.inference_mode()
def evaluate_perplexity(model: nn.Module, dataset: Any, tokenizer: Any = None, window: Optional[int] = None,
                        tokens: Optional[int] = None, threads: Optional[int] = None, batch_size: int = 1,
                        progress: bool = False, desc: Optional[str] = None) -> dict:
    """Perplexity = exp(mean next-token NLL) over non-overlapping windows, each scored on its own (no
    context carried across windows: a window of L tokens scores L - 1 predictions).

    `dataset`: a `rex.data.text.TextCorpus` (tokenized here with `tokenizer`, `window`/`tokens` override its
    own) or a LongTensor [n, L] of token windows. Returns dict(metric="perplexity", perplexity, nll (mean,
    nats), n (windows), n_tokens (predictions scored), tokens (in the windows), window, seconds)."""
    if isinstance(dataset, str):
        from ..data import get_dataset

        dataset = get_dataset(dataset)
    t0 = time.perf_counter()
    if isinstance(dataset, torch.Tensor):
        ids = dataset.long()
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ConfigError(f"token windows must be a [n, L >= 2] tensor, got shape {tuple(ids.shape)}")
    else:
        ids = dataset.windows(_tokenizer(tokenizer), window=window, tokens=tokens)
    model.eval()
    total, count = 0.0, 0
    with _num_threads(threads):
        for start in range(0, ids.shape[0], batch_size):
            w = ids[start:start + batch_size]
            logits = _logits(model(input_ids=w)).float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += w[:, 1:].numel()
    mean = total / count
    return dict(metric="perplexity", perplexity=math.exp(mean) if mean < 700 else float("inf"), nll=mean,
                n=int(ids.shape[0]), n_tokens=count, tokens=int(ids.numel()), window=int(ids.shape[1]),
                seconds=time.perf_counter() - t0)


def evaluate_text(model: nn.Module, dataset: Any, tokenizer: Any, task: str, threads: Optional[int] = None) -> dict:
    """The task's evaluator: "text_similarity" -> evaluate_sts, "language_modeling" -> evaluate_perplexity.
    The result has `value` (Spearman x100 or perplexity) and `higher_is_better` added."""
    if task == "text_similarity":
        r = evaluate_sts(model, dataset, tokenizer, threads=threads)
        return dict(r, value=r["spearman"], higher_is_better=True)
    if task == "language_modeling":
        r = evaluate_perplexity(model, dataset, tokenizer, threads=threads)
        return dict(r, value=r["perplexity"], higher_is_better=False)
    raise ConfigError(f"no text evaluator for task {task!r}; text tasks: text_similarity, language_modeling")
