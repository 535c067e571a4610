"""Expand a grid file (``conf/grid/*.yaml``, also the Snakemake config) into one record per job.

Only the standard library, PyYAML and ``rex.labels``: the Snakefile imports it (``from rex.pipeline import grid``)
and ``rex`` loads its heavy parts lazily, so building the DAG (``snakemake -n``) never imports torch and works
without any data.

A grid::

    name: default
    results_dir: results              # relative to the project root, or absolute
    protocol: {first_last: 8bit, granularity: per_channel}   # -> protocol.* (the same for every job)
    models:                           # one block per model; FP32 row added unless fp32: false
      - {model: mobilenet_v2, dataset: imagenet_sample, limit: null}
      - {model: resnet20_fmnist, dataset: fashion_mnist, limit: 2000, methods: [...]}   # own method list
    methods:                          # default method blocks, expanded as a product
      - {method: rtn, bits: [[8, 8], [4, 8]]}
      - {method: rex, bits: [[4, 8]], orders: [2, 3], budgets: [null, 1.5], allocation: uniform}
      - {method: rtn, bits: [[4, 32]], protocol: {granularity: per_group, group_size: 128}}  # this block only
      - {method: squant, bits: [[4, 8]], protocol: {preset: squant}}   # this block's protocol.* on top

Protocol presets (``rex.protocols``): a job's protocol is the grid's ``protocol`` with its method block's
``protocol`` on top. Under a preset other than ``shared``, a grid-level key at the shared preset's value counts
as not set (grid files list every key, at the shared values), so the preset fills it; a key in the method
block's ``protocol`` is always explicit (it overrides the preset). ``snakemake --config 'protocol={preset:
squant}'`` runs the whole grid under SQuant's protocol, in folders of their own (the preset is in the variant).

Sensible combinations only: a budget needs order >= 2 (``budgets`` entries are skipped for order 1, except
``null`` = dense), duplicate labels collapse, and two different settings mapping to one label are an error.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .. import protocols
from ..errors import ConfigError
from ..labels import FLOAT_BITS, FP32_METHOD, LABEL_RE, fp32_label, label, parse_label  # noqa: F401 (re-exported)

# Methods whose calibration is a distillation cached on disk (rex.zeroq), the same for every bit-width: the
# workflow runs a model's first such job before the others (common.smk), so it is computed once.
DISTILLING_METHODS = ("zeroq", "zeroq_lite")

TASKS = ("classification", "detection", "segmentation", "text_similarity", "language_modeling")
PRIMARY_METRIC = {"classification": "top1", "detection": "AP", "segmentation": "mIoU",
                  "text_similarity": "spearman", "language_modeling": "perplexity"}
METRICS = {
    "classification": ("top1", "top5", "agreement", "kl"),
    "detection": ("AP", "AP50", "AP75"),
    "segmentation": ("mIoU",),
    "text_similarity": ("spearman",),     # Spearman x100 of the embeddings' cosine similarity (STS-B)
    "language_modeling": ("perplexity",),  # exp(mean next-token NLL) over non-overlapping windows
}
# Metrics where lower is better: the tables mark the lowest as the best and read a positive delta vs FP32 as a loss.
LOWER_IS_BETTER = frozenset({"perplexity", "kl"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER
# a job's final statuses: "ok", or "n/a" when the method does not apply to the model (DFQ without BatchNorm);
# anything else is a failure (a failed job's row reads "failed")
NOT_APPLICABLE = "n/a"
FINAL_STATUSES = ("ok", NOT_APPLICABLE)
NAME_RE = r"[A-Za-z0-9_.-]+"
# A job folder: the label, plus ",p=<8 hex>" when the job's protocol, method options or dataset differ from the
# defaults (conf/config.yaml's protocol, no options, the model's own dataset): `--config protocol.mode=int`
# writes beside the fake-mode results instead of over them, and the default grid's folders keep their names.
VARIANT_RE = r"[0-9a-f]{8}"
JOB_LABEL_RE = LABEL_RE + r"(,p=" + VARIANT_RE + ")?"
_PLAIN = re.compile(r"^[A-Za-z0-9_./+-]+$")


class GridError(ValueError):
    """The grid file asks for something that cannot be expanded (unknown model conf, label clash, ...)."""


def hydra_value(v: Any) -> str:
    """A value as Hydra override grammar reads it back unchanged."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if _PLAIN.match(s) and s not in ("null", "true", "false"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def protocol_value(v: Any) -> str:
    """A protocol value as a Hydra override: a mapping (act_sigma_table) in Hydra's dict grammar."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    return hydra_value(v)


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def group_conf(conf_dir: Path, group: str, name: str) -> dict:
    path = Path(conf_dir) / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        raise GridError(f"no Hydra config {group}={name} ({path} does not exist); known: {', '.join(known)}")
    return load_yaml(path)


def _bits_pairs(bits: Iterable) -> list:
    out = []
    for pair in bits:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            w, a = pair
        elif isinstance(pair, dict):
            w, a = pair.get("w", pair.get("wbits")), pair.get("a", pair.get("abits"))
        else:
            raise GridError(f"bits entries are [wbits, abits] pairs, got {pair!r}")
        a = FLOAT_BITS if a in (None, FLOAT_BITS, "fp", "float") else a
        for what, v, ok in (("wbits", w, lambda v: 2 <= v <= 16), ("abits", a, lambda v: 2 <= v <= 16 or v == FLOAT_BITS)):
            if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
                raise GridError(f"bits {list(pair)!r}: {what} must be an integer in [2, 16]"
                                f"{' (or 32 / null = float activations)' if what == 'abits' else ''}, got {v!r}")
        out.append((w, a))
    return out


def expand_methods(blocks: Iterable[dict]) -> list:
    """Method blocks -> list of settings dicts (method, wbits, abits, order, budget, allocation, options)."""
    settings = []
    for block in blocks:
        block = dict(block)
        method = block.pop("method")
        bits = _bits_pairs(block.pop("bits", [[4, 8]]))
        orders = [int(k) for k in block.pop("orders", [1])]
        budgets = list(block.pop("budgets", [None]))
        allocation = block.pop("allocation", "uniform")
        options = dict(block.pop("options", {}) or {})
        protocol = block.pop("protocol", None) or {}
        if not isinstance(protocol, dict):
            raise GridError(f"method block for {method!r}: protocol must be a mapping of protocol.* keys (e.g. "
                            f"{{preset: squant}}), got {protocol!r}")
        if protocol.get("granularity") == "per_group" and not protocol.get("group_size"):
            raise GridError(f"method block for {method!r}: granularity per_group needs group_size (e.g. 128) in "
                            "the same protocol block")
        if block:
            raise GridError(f"method block for {method!r} has unknown keys {sorted(block)}")
        for w, a in bits:
            for k in orders:
                for b in budgets:
                    if b is not None and k < 2:
                        continue  # a budget pays for orders >= 2 only
                    settings.append(dict(method=method, wbits=w, abits=a, order=k,
                                         budget=None if b is None else float(b),
                                         allocation=allocation if b is not None else "uniform",
                                         options=options, protocol=dict(protocol)))
    return settings


def results_dir(config: dict, project_root: Path) -> Path:
    r = Path(str(config.get("results_dir") or "results")).expanduser()
    r = r if r.is_absolute() else Path(project_root) / r
    if r.exists() and not r.is_dir():
        raise GridError(f"results_dir {r} is a file, not a folder; set results_dir to a folder "
                        "(it is created when missing)")
    return r


def check_keys(config: Any, schema: dict, where: str = "grid", root: Optional[dict] = None) -> None:
    """Name the first key the JSON schema does not allow (and the allowed ones), instead of the schema dump that
    `snakemake.utils.validate` prints. Walks objects with ``additionalProperties: false`` and list items."""
    import difflib

    root = schema if root is None else root
    ref = schema.get("$ref", "")
    if ref.startswith("#/"):  # a local reference, e.g. {$ref: "#/$defs/methods"}
        schema = root
        for part in ref[2:].split("/"):
            schema = schema.get(part, {})
    if isinstance(config, dict) and schema.get("type") in ("object", None) and "properties" in schema:
        allowed = schema["properties"]
        patterns = list(schema.get("patternProperties") or {})
        for key, value in config.items():
            if key in allowed:
                check_keys(value, allowed[key], f"{where}.{key}" if where != "grid" else str(key), root)
            elif any(re.search(pat, str(key)) for pat in patterns):
                continue
            elif schema.get("additionalProperties", True) is False:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                place = "the grid" if where == "grid" else where
                raise GridError(f"unknown key {key!r} in {place}{hint} (allowed: {', '.join(sorted(allowed))})")
    elif isinstance(config, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(config):
            check_keys(item, schema["items"], f"{where}[{i}]", root)


def relpath(p: Path, project_root: Path) -> str:
    """Paths in the DAG relative to the project root (the Snakemake working directory) when inside it."""
    p = Path(p)
    try:
        return str(p.resolve().relative_to(Path(project_root).resolve()))
    except ValueError:
        return str(p)


def checkpoint_path(config: dict, project_root: Path, model: str) -> str:
    base = config.get("models_dir")
    d = Path(base) if base else results_dir(config, project_root) / "models"
    if not d.is_absolute():
        d = Path(project_root) / d
    return relpath(d / model / "model.pt", project_root)


def protocol_defaults(conf_dir: Path) -> dict:
    return dict(load_yaml(Path(conf_dir) / "config.yaml").get("protocol") or {})


def resolved_protocol(protocol: dict, defaults: dict) -> dict:
    """``defaults`` (conf/config.yaml's protocol) with ``protocol`` on top, every key the preset governs and
    leaves null filled from the preset (``rex.protocols.resolve``): what the job's QuantSpec will hold."""
    try:
        return protocols.resolve({**defaults, **protocol})
    except ConfigError as exc:
        raise GridError(str(exc)) from None


def job_protocol(grid_protocol: dict, block_protocol: Optional[dict] = None, defaults: Optional[dict] = None) -> dict:
    """The protocol.* overrides of one job: the grid's, then its method block's. Under a preset other than
    shared, a grid-level key the preset governs that holds the shared value is dropped (grid files list every
    key, at the shared values): the preset fills it. Method-block keys are always kept."""
    block_protocol = dict(block_protocol or {})
    preset = block_protocol.get("preset", grid_protocol.get("preset", (defaults or {}).get("preset")))
    out = dict(grid_protocol)
    if preset not in (None, protocols.DEFAULT_PRESET):
        shared = protocols.resolve({"preset": protocols.DEFAULT_PRESET})
        out = {k: v for k, v in out.items() if not (k in protocols.GOVERNED and v == shared[k])}
    out.update(block_protocol)
    return out


def variant(protocol: dict, defaults: dict, options: Optional[dict] = None, dataset: Optional[str] = None,
            default_dataset: Optional[str] = None, inputs: Optional[dict] = None) -> str:
    """'' for a job of the default protocol, no method options and the model's own dataset; else the first 8
    hex digits of the sha256 of what differs (the ``p=`` part of the folder name). Protocols are compared
    resolved (``resolved_protocol``): a preset is in the identity with every value it sets, and a key set to
    the value the defaults resolve to changes nothing."""
    job, base = resolved_protocol(protocol, defaults), resolved_protocol({}, defaults)
    diff = {f"protocol.{k}": v for k, v in sorted(job.items()) if k not in base or base[k] != v}
    diff.update({f"method.options.{k}": v for k, v in sorted((options or {}).items())})
    if dataset and default_dataset and dataset != default_dataset:
        diff["dataset"] = dataset
    # a user's own checkpoint or data folder (model block ``weights:`` / ``data_root:``) changes every number
    diff.update({k: v for k, v in sorted((inputs or {}).items()) if v is not None})
    if not diff:
        return ""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(diff, sort_keys=True, default=str).encode()).hexdigest()[:8]


def job_label(base: str, tag: str) -> str:
    return f"{base},p={tag}" if tag else base


def split_variant(folder: str) -> tuple[str, str]:
    """``method=rtn,w=8,a=8,K=1,p=1a2b3c4d`` -> (``method=rtn,w=8,a=8,K=1``, ``1a2b3c4d``)."""
    m = re.fullmatch(r"(.*),p=(" + VARIANT_RE + ")", folder)
    return (m.group(1), m.group(2)) if m else (folder, "")


def expand(config: dict, project_root: Path, conf_dir: Optional[Path] = None) -> list:
    """The grid -> list of job dicts (task, model, dataset, label, method, wbits, abits, order, budget,
    allocation, limit, checkpoint, train_args, overrides, dir)."""
    project_root = Path(project_root)
    conf_dir = Path(conf_dir) if conf_dir else project_root / "conf"
    rdir = results_dir(config, project_root)
    protocol = dict(config.get("protocol") or {})
    proto_defaults = protocol_defaults(conf_dir)
    default_blocks = config.get("methods") or []
    jobs, seen = [], {}
    for mblock in config.get("models") or []:
        mblock = dict(mblock)
        model = mblock["model"]
        mconf = group_conf(conf_dir, "model", model)
        task = mconf.get("task", "classification")
        if task not in TASKS:
            raise GridError(f"conf/model/{model}.yaml: task must be one of {TASKS}, got {task!r}")
        dataset = mblock.get("dataset") or mconf.get("dataset")
        dconf = group_conf(conf_dir, "dataset", dataset)
        root_key = dconf.get("root_config_key")
        root = config.get(root_key) if root_key else None
        # a paper-scale grid may point one model at the user's own checkpoint and data folder
        user_weights, user_root = mblock.get("weights"), mblock.get("data_root")
        root = user_root if user_root is not None else root
        inputs = {"model.weights": user_weights, "dataset.root": user_root}
        limit = mblock.get("limit")
        trained_here = bool(mconf.get("trained_here", False)) and user_weights is None
        ckpt = user_weights or (checkpoint_path(config, project_root, model) if trained_here else None)
        common = [f"model={model}", f"dataset={dataset}", f"evaluation={task}",
                  f"evaluation.limit={hydra_value(limit)}"]
        if mblock.get("batch_size"):
            common.append(f"evaluation.batch_size={int(mblock['batch_size'])}")
        if root is not None:
            common.append(f"dataset.root={hydra_value(str(root))}")
        if ckpt:
            common.append(f"model.weights={hydra_value(ckpt)}")
        settings = []
        if mblock.get("fp32", True):
            settings.append(dict(method=FP32_METHOD, wbits=FLOAT_BITS, abits=FLOAT_BITS, order=1, budget=None,
                                 allocation="uniform", options={}, protocol={}))
        settings += expand_methods(mblock.get("methods", default_blocks))
        for m in sorted({s["method"] for s in settings} - {FP32_METHOD}):
            group_conf(conf_dir, "method", m)  # an unknown method fails here, at DAG time, not in every job
        for s in settings:
            # the float model's numbers depend on its dataset only, not on the quantization protocol
            fp = s["method"] == FP32_METHOD
            jproto = job_protocol(protocol, s.get("protocol"), proto_defaults)
            tag = variant({} if fp else jproto, proto_defaults, s["options"], dataset, mconf.get("dataset"), inputs)
            preset = "" if fp else resolved_protocol(jproto, proto_defaults)["preset"]
            lab = job_label(label(s["method"], s["wbits"], s["abits"], s["order"], s["budget"], s["allocation"]), tag)
            if not re.fullmatch(JOB_LABEL_RE, lab):
                raise GridError(f"label {lab!r} does not match {JOB_LABEL_RE}")
            key = (task, model, lab)
            ov = [f"method={s['method']}"]
            if s["method"] != FP32_METHOD:
                ov += [f"method.wbits={s['wbits']}", f"method.abits={s['abits']}", f"method.order={s['order']}",
                       f"method.budget={hydra_value(s['budget'])}", f"method.allocation={s['allocation']}"]
                ov += [f"++method.options.{k}={hydra_value(v)}" for k, v in sorted(s["options"].items())]
            overrides = common + [f"protocol.{k}={protocol_value(v)}" for k, v in sorted(jproto.items())] + ov
            if key in seen:
                if seen[key]["overrides"] != overrides:
                    raise GridError(f"two different settings of {model} map to the same folder {lab!r}; "
                                    "give them different methods/options or split the grid")
                continue
            job = dict(task=task, model=model, dataset=dataset, label=lab, variant=tag, preset=preset,
                       method=s["method"],
                       group_size=jproto.get("group_size") if jproto.get("granularity") == "per_group" else None,
                       wbits=s["wbits"], abits=s["abits"], order=s["order"], budget=s["budget"],
                       allocation=s["allocation"], limit=limit, checkpoint=ckpt, overrides=overrides,
                       dir=relpath(rdir / "runs" / task / model / lab, project_root))
            seen[key] = job
            jobs.append(job)
    return jobs


def train_specs(config: dict, project_root: Path, conf_dir: Optional[Path] = None) -> dict:
    """model -> {'checkpoint': path, 'args': [...]} for the models of the grid that are trained here."""
    conf_dir = Path(conf_dir) if conf_dir else Path(project_root) / "conf"
    out = {}
    for mblock in config.get("models") or []:
        model = mblock["model"]
        mconf = group_conf(conf_dir, "model", model)
        if mconf.get("trained_here") and mblock.get("weights") is None:  # a user's checkpoint is not trained here
            args = [str(a) for a in (mblock.get("train_args") or mconf.get("train_args") or [])]
            if model in out and out[model]["args"] != args:
                raise GridError(f"{model} is listed twice with different train_args")
            out[model] = {"checkpoint": checkpoint_path(config, project_root, model), "args": args}
    return out


def quote_overrides(overrides: Iterable[str]) -> str:
    return " ".join(shlex.quote(o) for o in overrides)


def baselines_args(config: dict) -> tuple[str, str]:
    """(model, shell-quoted arguments of workflow/scripts/baselines_table.py) from the grid's ``baselines:``."""
    bl = dict(config.get("baselines") or {})
    model = str(bl.get("model", "mobilenet_v2"))
    args = ["--model", model, "--dataset", str(bl.get("dataset", "imagenet_sample"))]
    for key, flag in (("limit", "--limit"), ("settings", "--settings"), ("methods", "--methods"),
                      ("per_tensor", "--per-tensor")):
        if bl.get(key) is not None:
            args += [flag, str(bl[key])]
    return model, quote_overrides(args)
