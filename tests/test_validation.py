"""Bad input gives a clear error, a non-zero exit (CLI) or a FAILED record (pipeline job), and no result file
that looks complete -- at every level: QuantSpec, the CLI (`python -m rex quantize`), the pipeline job
(`python -m rex.pipeline.job`, Hydra overrides) and the Snakemake grid (`snakemake -n`).

Every case uses a ResNet-20 (Fashion-MNIST architecture) with fixed random weights saved to a temporary file,
so nothing here needs a trained checkpoint; most CLI cases run `rex.__main__.main` in-process (same code as
the command) and a representative subset runs the real command in a subprocess.
"""
from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rex.errors import CheckpointError, ConfigError, DatasetError, UnknownNameError, WeightError
from rex.paths import PROJECT_ROOT
from rex.spec import QuantSpec

ROOT = PROJECT_ROOT
MODEL = "resnet20_fmnist"


# ------------------------------------------------------------------------------------------- fixtures

class Evil:
    """Unpickling this would create a folder: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _idx(path: Path, dims: tuple, payload: bytes) -> None:
    head = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(head + payload)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Checkpoints and dataset folders, good and bad."""
    from rex.models.small import BUILDERS

    d = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    model = BUILDERS[MODEL]()
    with torch.no_grad():  # non-trivial BN statistics, so ranges and metrics are not degenerate
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    sd = model.state_dict()
    f = {"dir": d, "good": d / "good.pt"}
    torch.save(sd, f["good"])
    raw = f["good"].read_bytes()
    f["truncated"] = d / "truncated.pt"
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    f["garbage"] = d / "garbage.pt"
    f["garbage"].write_bytes(random.Random(0).randbytes(4096))
    f["empty"] = d / "empty.pt"
    f["empty"].write_bytes(b"")
    f["other_arch"] = d / "other_arch.pt"
    torch.save(BUILDERS["mobilenetv2_fmnist"]().state_dict(), f["other_arch"])
    first = next(k for k, v in sd.items() if k.endswith("weight") and v.dim() == 4)
    for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
        s = {k: v.clone() for k, v in sd.items()}
        s[first].view(-1)[3] = value
        f[kind] = d / f"{kind}.pt"
        torch.save(s, f[kind])
    s = {k: v.clone() for k, v in sd.items()}
    zero_layers = [k for k, v in s.items() if k.endswith("conv1.weight")]
    for k in zero_layers:
        s[k].zero_()
    f["zero_layers"] = d / "zero_layers.pt"
    torch.save(s, f["zero_layers"])
    f["evil_marker"] = d / "pwned"
    f["evil"] = d / "evil.pt"
    torch.save({**sd, "x": Evil(str(f["evil_marker"]))}, f["evil"])
    f["evil_pickle"] = d / "evil.pkl"
    f["evil_pickle"].write_bytes(pickle.dumps(Evil(str(f["evil_marker"])), protocol=2))
    f["not_a_state_dict"] = d / "list.pt"
    torch.save([1, 2, 3], f["not_a_state_dict"])
    # datasets
    f["fm_missing"] = d / "no_such_folder"
    f["fm_empty"] = d / "fm_empty"
    f["fm_empty"].mkdir()
    _idx(f["fm_empty"] / "t10k-images-idx3-ubyte.gz", (0, 28, 28), b"")
    _idx(f["fm_empty"] / "t10k-labels-idx1-ubyte.gz", (0,), b"")
    f["fm_garbage"] = d / "fm_garbage"
    f["fm_garbage"].mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (f["fm_garbage"] / name).write_bytes(random.Random(1).randbytes(1000))
    f["fm_truncated"] = d / "fm_truncated"
    f["fm_truncated"].mkdir()
    _idx(f["fm_truncated"] / "t10k-images-idx3-ubyte.gz", (10000, 28, 28), bytes(1000))
    _idx(f["fm_truncated"] / "t10k-labels-idx1-ubyte.gz", (10000,), bytes(10000))
    f["in_empty"] = d / "imagenet_empty"
    f["in_empty"].mkdir()
    (f["in_empty"] / "labels.txt").write_text("# no images\n")
    f["in_unreadable"] = d / "imagenet_unreadable"
    f["in_unreadable"].mkdir()
    (f["in_unreadable"] / "a.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    (f["in_unreadable"] / "labels.txt").write_text("a.JPEG 0\n")
    return f


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """FP32 references and decoded datasets of these throw-away weights go to a temporary cache."""
    cache = tmp_path_factory.getbasetemp() / "rex_cache_validation"
    monkeypatch.setenv("REX_CACHE", str(cache))


def cli_inproc(args: list, json_out: Path | None = None) -> tuple[int, str]:
    """`python -m rex quantize ...` in-process: (exit status, stderr)."""
    from rex.__main__ import main

    argv = ["quantize", "--quiet", *args] + (["--json", str(json_out)] if json_out else [])
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def cli_sub(args: list, json_out: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "rex", "quantize", "--quiet", *args] + (["--json", str(json_out)] if json_out else [])
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def assert_clean_error(rc, stderr: str, needles: tuple, json_out: Path | None = None) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one 'error: ...' line, got: {lines}"
    for n in needles:
        assert n.lower() in errors[0].lower(), f"{n!r} not in {errors[0]!r}"
    if json_out is not None:
        assert not json_out.exists() and not list(json_out.parent.glob(f".{json_out.name}*")), "partial result left"
    return errors[0]


# ------------------------------------------------------------------------------------------ QuantSpec

@pytest.mark.parametrize("kw, needles", [
    (dict(method="nosuch"), ("unknown method 'nosuch'", "known methods", "rex")),
    (dict(method=3), ("method must be a method name",)),
    (dict(wbits=1), ("wbits", "[2, 16]")),
    (dict(wbits=17), ("wbits", "[2, 16]")),
    (dict(wbits="4"), ("wbits", "integer")),
    (dict(wbits=4.0), ("wbits", "integer")),
    (dict(abits=1), ("abits", "[2, 16]", "32 or None")),
    (dict(abits=64), ("abits", "[2, 16]")),
    (dict(order=0), ("order K must be an integer >= 1",)),
    (dict(order=2.5), ("order K must be an integer",)),
    (dict(order=2, budget=0.5), ("budget must be >= 1",)),
    (dict(order=2, budget=3.0), ("unreachable", "raise order to >= 3")),
    (dict(order=1, budget=1.5), ("needs order >= 2",)),
    (dict(order=2, budget=float("nan")), ("finite number",)),
    (dict(order=2, budget=float("inf")), ("finite number",)),
    (dict(order=2, budget="1.5"), ("budget must be",)),
    (dict(allocation="best"), ("allocation must be one of", "greedy")),
    (dict(granularity="per_row"), ("granularity must be one of",)),
    (dict(mode="int8"), ("mode must be one of", "fake")),
    (dict(first_last="16bit"), ("first_last must be one of",)),
    (dict(criterion="random"), ("criterion must be one of",)),
    (dict(act_sigma=-1.0), ("act_sigma must be a finite number > 0",)),
    (dict(act_sigma=float("inf")), ("act_sigma",)),
    (dict(symmetric="yes"), ("symmetric must be true or false",)),
    (dict(fold_bn=1), ("fold_bn must be true or false",)),
    (dict(seed=-1), ("seed must be an integer >= 0",)),
    (dict(seed="abc"), ("seed must be an integer",)),
    (dict(options=[1]), ("options must be a mapping",)),
    (dict(method="ocs", options={"expand_ratoi": 0.1}), ("no option 'expand_ratoi'", "did you mean 'expand_ratio'")),
    (dict(method="rex", options={"foo": 1}), ("no option 'foo'", "its options: none")),
])
def test_quantspec_rejects(kw, needles):
    with pytest.raises((ConfigError, UnknownNameError)) as e:
        QuantSpec(**kw)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_quantspec_unknown_keys_from_dict_and_config():
    with pytest.raises(ConfigError, match="unknown QuantSpec key 'wbit' .did you mean 'wbits'"):
        QuantSpec.from_dict({"wbit": 4})
    with pytest.raises(ConfigError, match="unknown key method.bogus; accepted method keys"):
        QuantSpec.from_config({"name": "rex", "wbits": 4, "bogus": 1}, {})
    with pytest.raises(ConfigError, match="unknown key protocol.mdoe .did you mean 'mode'"):
        QuantSpec.from_config({"name": "rex"}, {"mdoe": "int"})
    spec = QuantSpec(method="rex", wbits=4, abits=8, order=2, budget=1.5, seed=3)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_config({"name": "rex", "wbits": 4, "abits": 8, "order": 2, "budget": 1.5,
                                  "allocation": "uniform", "options": {}}, {"seed": 3}) == spec


def test_every_builtin_method_option_is_declared():
    """The methods' typed configs (the keys QuantSpec accepts) cover every option the built-in methods read:
    a method reads its options as ``spec.config.<field>``, never from the raw ``spec.options`` dict."""
    import dataclasses
    import re

    from rex.methods import get_entry, method_names

    read, raw = set(), []
    for p in (ROOT / "rex" / "methods").glob("*.py"):
        read |= set(re.findall(r"cfg\.(\w+)", p.read_text())) | set(re.findall(r"spec\.config\.(\w+)", p.read_text()))
        if p.name != "__init__.py" and re.search(r"spec\.options|_opt\(", p.read_text()):
            raw.append(p.name)
    declared = set()
    for name in method_names():
        cfg = get_entry(name).config
        assert cfg is not None, f"built-in method {name} has no typed config"
        declared |= {f.name for f in dataclasses.fields(cfg)}
    read -= {"describe", "validate"}
    assert not raw, f"methods reading spec.options directly: {raw}"
    assert read <= declared, f"options read but not declared in a method config: {sorted(read - declared)}"


# ---------------------------------------------------------------------------------------- checkpoints

def test_checkpoints_only_loaded_with_weights_only():
    """Every torch.load in the code base passes weights_only=True; no pickle.load / allow_pickle anywhere."""
    offenders = []
    for folder in ("rex", "workflow"):
        for p in (ROOT / folder).rglob("*.py"):
            src = p.read_text()
            for node in ast.walk(ast.parse(src)):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "torch.load":
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
                if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load"):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} {name}")
                for k in node.keywords:
                    if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                        offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} allow_pickle")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("which", ["evil", "evil_pickle"])
def test_malicious_pickle_is_refused(bad, which):
    from rex.models import get_model

    with pytest.raises(CheckpointError, match="truncated, corrupted or not a PyTorch state_dict") as e:
        get_model(MODEL, weights=bad[which])
    assert not bad["evil_marker"].exists(), "the pickle's payload ran"
    msg = str(e.value)
    assert "GLOBAL posix.mkdir" in msg and "refuses" in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg  # never advise it


@pytest.mark.parametrize("which, exc, needles", [
    ("truncated", CheckpointError, ("cannot read", "truncated")),
    ("garbage", CheckpointError, ("cannot read", "not a PyTorch state_dict")),
    ("empty", CheckpointError, ("is empty (0 bytes)",)),
    ("not_a_state_dict", CheckpointError, ("does not hold a state_dict",)),
    ("other_arch", CheckpointError, ("does not match the ResNet20 architecture",)),
])
def test_bad_checkpoint_library(bad, which, exc, needles):
    from rex.models import get_model

    with pytest.raises(exc) as e:
        get_model(MODEL, weights=bad[which])
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ["nan", "inf"])
def test_non_finite_weights_library(bad, which):
    import rex
    from rex.models import get_model

    model = get_model(MODEL, weights=bad[which]).model
    with pytest.raises(WeightError, match=("1 NaN" if which == "nan" else "1 Inf") + ".*Nothing was quantized"):
        rex.quantize(model, rex.QuantSpec(method="rex", wbits=4, order=2), example_input=torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("method", ["rex", "rtn", "dfq", "squant", "ocs", "rex_squant", "rex_dfq"])
@pytest.mark.parametrize("mode", ["fake", "int"])
def test_all_zero_layers_work(method, mode):
    """A layer whose weights are all zero (or a whole zero model) quantizes exactly (zero scale handled)."""
    import rex

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4)).eval()
    with torch.no_grad():
        m[3].weight.zero_()
    x = torch.randn(2, 3, 8, 8)
    order = 2 if method.startswith("rex") else 1
    q = rex.quantize(m, rex.QuantSpec(method=method, wbits=4, abits=8, order=order, mode=mode),
                     example_input=x[:1], input_range=(-4.0, 4.0))
    y = q(x)
    assert torch.isfinite(y).all()
    rep = rex.report(q)
    zero = [r for r in rep if r["max_err"] == 0.0]  # the zero layer (OCS may rename it) is represented exactly
    assert zero and all(r["bound_ok"] is not False for r in zero)
    # with a BatchNorm: DFQ does not apply to a model without one (n/a, tests/test_text_pipeline.py)
    z = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(144, 2)).eval()
    for p in z.parameters():
        p.data.zero_()
    qz = rex.quantize(z, rex.QuantSpec(method=method, wbits=4, abits=8, order=order, mode=mode),
                      example_input=x[:1], input_range=(-4.0, 4.0))
    assert torch.equal(qz(x), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------ CLI

def _cli_cases(bad):
    good = ["--model", MODEL, "--weights", str(bad["good"])]
    return {
        "unknown model": (["--model", "nosuch"], ("unknown model 'nosuch'", "known models", "resnet20_fmnist")),
        "unknown dataset": (good + ["--dataset", "nosuch"], ("unknown dataset 'nosuch'", "fashion_mnist")),
        "unknown method": (good + ["--method", "nosuch"], ("unknown method 'nosuch'", "known methods", "rtn")),
        "wbits 1": (good + ["--wbits", "1"], ("wbits", "[2, 16]")),
        "wbits 17": (good + ["--wbits", "17"], ("wbits", "[2, 16]")),
        "abits 1": (good + ["--abits", "1"], ("abits", "[2, 16]")),
        "abits 64": (good + ["--abits", "64"], ("abits", "[2, 16]")),
        "wbits not a number": (good + ["--wbits", "four"], ("--wbits", "integer in 2..16", "'four'", "--help")),
        "order 0": (good + ["--order", "0"], ("order K must be an integer >= 1",)),
        "order not a number": (good + ["--order", "two"], ("--order", "integer")),
        "budget < 1": (good + ["--order", "2", "--budget", "0.5"], ("budget must be >= 1",)),
        "budget ratio unreachable": (good + ["--order", "2", "--budget", "3"], ("unreachable", "order")),
        "budget absolute unreachable": (good + ["--order", "2", "--budget", "1000"], ("unreachable", "below the plain")),
        "budget without order": (good + ["--budget", "1.5"], ("needs order >= 2",)),
        "budget not a number": (good + ["--budget", "lots"], ("--budget", "number")),
        "unknown option key": (good + ["--method", "ocs", "--option", "expand_ratoi=0.1"],
                               ("no option 'expand_ratoi'", "did you mean 'expand_ratio'")),
        "malformed option": (good + ["--option", "foo"], ("KEY=VALUE",)),
        "option out of range": (good + ["--method", "ocs", "--option", "expand_ratio=3"], ("expand_ratio", "[0, 1]")),
        "order-1 baseline with order 2": (good + ["--method", "dfq", "--order", "2"], ("order-1 baseline", "rex_dfq")),
        "act-sigma < 0": (good + ["--act-sigma", "-1"], ("act_sigma",)),
        "limit 0": (good + ["--eval", "--limit", "0"], ("--limit", "positive integer")),
        "batch-size 0": (good + ["--eval", "--batch-size", "0"], ("--batch-size", "positive integer")),
        "threads 0": (good + ["--threads", "0"], ("--threads", "positive integer")),
        "mode not a choice": (good + ["--mode", "int8"], ("--mode", "invalid choice", "fake")),
        "unknown flag": (good + ["--wbit", "4"], ("unrecognized arguments", "--wbit")),
        "weights file missing": (["--model", MODEL, "--weights", str(bad["dir"] / "nope.pt")], ("no such file",)),
        "truncated checkpoint": (["--model", MODEL, "--weights", str(bad["truncated"])], ("cannot read", "truncated")),
        "corrupted checkpoint": (["--model", MODEL, "--weights", str(bad["garbage"])], ("cannot read", "corrupted")),
        "empty checkpoint": (["--model", MODEL, "--weights", str(bad["empty"])], ("empty (0 bytes)",)),
        "checkpoint of another architecture": (["--model", MODEL, "--weights", str(bad["other_arch"])],
                                               ("does not match", "architecture")),
        "malicious pickle": (["--model", MODEL, "--weights", str(bad["evil"])], ("cannot read", "state_dict")),
        "NaN weights": (["--model", MODEL, "--weights", str(bad["nan"])], ("1 NaN", "nothing was quantized")),
        "Inf weights": (["--model", MODEL, "--weights", str(bad["inf"])], ("1 Inf", "finite")),
        "dataset folder missing": (good + ["--dataset", "fashion_mnist", "--data-root", str(bad["fm_missing"])],
                                   ("not found in", "no_such_folder", "REX_FMNIST_ROOT")),
        "dataset files garbage": (good + ["--dataset", "fashion_mnist", "--data-root", str(bad["fm_garbage"])],
                                  ("not a uint8 IDX file",)),
        "dataset files truncated": (good + ["--dataset", "fashion_mnist", "--data-root", str(bad["fm_truncated"])],
                                    ("truncated",)),
        # an ImageNet folder needs an ImageNet model: a 10-class net on it is refused first (issue 13 item 5)
        "image folder empty": (["--model", "mobilenet_v2", "--dataset", "imagenet_sample", "--data-root", str(bad["in_empty"])],
                               ("lists no images",)),
        "unreadable image": (["--model", "mobilenet_v2", "--dataset", "imagenet_sample", "--data-root", str(bad["in_unreadable"])],
                             ("cannot read image", "a.JPEG")),
        "data-root without eval": (good + ["--data-root", str(bad["fm_empty"])], ("--data-root needs --eval",)),
        "detection model in classification CLI": (["--model", "fastestdet_coco"], ("detection model",)),
    }


CLI_CASES = list(_cli_cases({k: Path("/x") for k in (
    "good", "dir", "truncated", "garbage", "empty", "other_arch", "evil", "nan", "inf", "fm_missing", "fm_garbage",
    "fm_truncated", "in_empty", "in_unreadable", "fm_empty")}))


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(bad, case, tmp_path):
    args, needles = _cli_cases(bad)[case]
    out = tmp_path / "out" / "result.json"
    rc, err = cli_inproc(args, out)
    assert_clean_error(rc, err, needles, out)
    assert not bad["evil_marker"].exists()


def test_cli_empty_idx_dataset(bad, tmp_path):
    out = tmp_path / "result.json"
    rc, err = cli_inproc(["--model", MODEL, "--weights", str(bad["good"]), "--dataset", "fashion_mnist",
                          "--data-root", str(bad["fm_empty"])], out)
    assert_clean_error(rc, err, ("holds no images", "empty dataset"), out)


# the real command, in a subprocess: exit status 2, one line, no traceback
SUBPROCESS_CASES = ["unknown model", "wbits 17", "wbits not a number", "budget ratio unreachable",
                    "truncated checkpoint", "malicious pickle", "NaN weights", "dataset folder missing",
                    "unreadable image"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_bad_input_subprocess(bad, case, tmp_path):
    args, needles = _cli_cases(bad)[case]
    out = tmp_path / "result.json"
    r = cli_sub(args, out, env={"REX_CACHE": str(tmp_path / "cache")})
    assert_clean_error(r.returncode, r.stderr, needles, out)
    assert not bad["evil_marker"].exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_cli_good_input_and_zero_layers(bad, tmp_path):
    """Control: the same command with good weights (and with all-zero layers) succeeds and writes the JSON."""
    for which in ("good", "zero_layers"):
        out = tmp_path / f"{which}.json"
        rc, err = cli_inproc(["--model", MODEL, "--weights", str(bad[which]), "--order", "2", "--budget", "1.5",
                              "--eval", "--limit", "20"], out)
        assert rc == 0, err
        res = json.loads(out.read_text())
        assert res["n"] == 20 and res["bops"] > 0 and 0 <= res["top1"] <= 100


def test_cli_int_mode_warns_about_int32_overflow(bad):
    """mode=int with wide bit-widths: one 'warning:' line naming the layers whose int32 accumulator can overflow."""
    rc, err = cli_inproc(["--model", MODEL, "--weights", str(bad["good"]), "--wbits", "16", "--abits", "16",
                          "--mode", "int"])
    assert rc == 0, err
    warns = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warns) >= 1 and "int32" in warns[0] and "layer1.0.conv1" in warns[0], err
    rc, err = cli_inproc(["--model", MODEL, "--weights", str(bad["good"]), "--wbits", "4", "--abits", "8",
                          "--mode", "int"])
    assert rc == 0 and "int32" not in err, err


# ------------------------------------------------------------------------------- pipeline job (Hydra)

def _job_base(bad) -> list:
    return [f"model={MODEL}", "dataset=fashion_mnist", "evaluation=classification", "evaluation.limit=20",
            f"model.weights={bad['good']}", "method=rex", "method.wbits=4", "method.abits=8", "method.order=2"]


JOB_CASES = {
    "unknown model (Hydra group)": (["model=nosuch"], "MissingConfigException", ("model/nosuch", "Available options")),
    "unknown method (Hydra group)": (["method=nosuch"], "MissingConfigException", ("method/nosuch", "rex")),
    "unknown dataset (Hydra group)": (["dataset=nosuch"], "MissingConfigException", ("dataset/nosuch",)),
    "unknown method name in config": (["method.name=nosuch"], "UnknownNameError", ("unknown method 'nosuch'",)),
    "unknown top-level key": (["foo=1"], "ConfigCompositionException", ("foo",)),
    "unknown group key": (["method.bogus=1"], "ConfigCompositionException", ("method.bogus",)),
    "wbits wrong type": (["method.wbits=abc"], "ConfigError", ("wbits", "integer in [2, 16]", "'abc'")),
    "wbits 17": (["method.wbits=17"], "ConfigError", ("wbits", "[2, 16]")),
    "abits 1": (["method.abits=1"], "ConfigError", ("abits", "[2, 16]")),
    "order 0": (["method.order=0"], "ConfigError", ("order K must be an integer >= 1",)),
    "budget < 1": (["method.budget=0.5"], "ConfigError", ("budget must be >= 1",)),
    "budget unreachable": (["method.budget=3"], "ConfigError", ("unreachable",)),
    "mode not a choice": (["protocol.mode=bogus"], "ConfigError", ("mode must be one of",)),
    "seed wrong type": (["protocol.seed=abc"], "ConfigError", ("seed must be an integer",)),
    "symmetric wrong type": (["protocol.symmetric=maybe"], "ConfigError", ("symmetric must be true or false",)),
    "option typo": (["method=ocs", "method.order=1", "+method.options.expand_ratoi=0.1"], "ConfigError",
                    ("did you mean 'expand_ratio'",)),
    "limit 0": (["evaluation.limit=0"], "ConfigError", ("limit must be a positive number",)),
    "evaluation contradicts model": (["evaluation=detection"], "ConfigError", ("classification model",)),
    "dataset folder missing": (["dataset.root=/nonexistent/fmnist"], "DatasetError", ("not found in",)),
    "truncated checkpoint": (["model.weights={truncated}"], "CheckpointError", ("truncated",)),
    "checkpoint of another architecture": (["model.weights={other_arch}"], "CheckpointError", ("does not match",)),
    "NaN weights": (["model.weights={nan}"], "WeightError", ("NaN",)),
    "malicious pickle": (["model.weights={evil}"], "CheckpointError", ("state_dict",)),
    "unreadable dataset files": (["dataset.root={fm_garbage}"], "DatasetError", ("not a uint8 IDX file",)),
}
APPENDED_KEY_CASES = {  # keys Hydra lets through (appended with +) and run / evaluation values
    "appended unknown method key": (["+method.bogus=1"], "ConfigError", ("method.bogus",)),
    "appended unknown protocol key": (["+protocol.mdoe=int"], "ConfigError", ("protocol.mdoe", "did you mean 'mode'")),
    "batch_size 0": (["evaluation.batch_size=0"], "ConfigError", ("batch_size",)),
    "threads wrong type": (["run.threads=many"], "ConfigError", ("threads",)),
}


# Missing / corrupt data and checkpoint files are faults of the environment: the job exits 75 without `done`
# (the next run retries it); every other bad input is the configuration's and stays the row's result.
ENV_FAULTS = {"DatasetError": 75, "CheckpointError": 75}


def run_job(bad, tmp_path, extra: list, subprocess_: bool = False, expect_rc: int = 0,
            label: str = "method=rex,w=4,a=8,K=2") -> tuple[Path, dict]:
    out = tmp_path / "runs" / "classification" / MODEL / label
    extra = [x.format(**{k: v for k, v in bad.items()}) for x in extra]
    groups = {x.split("=", 1)[0] for x in extra if "=" in x and "." not in x.split("=", 1)[0]}
    base = [x for x in _job_base(bad) if x.split("=", 1)[0] not in groups
            and not (x.startswith("method.") and "method" in groups)]
    overrides = base + extra
    argv = ["--out", str(out), "--no-mlflow", *overrides]
    if subprocess_:
        r = subprocess.run([sys.executable, "-m", "rex.pipeline.job", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env={**os.environ})
        assert r.returncode == expect_rc, r.stderr[-3000:]
    else:
        from rex.pipeline.job import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == expect_rc
    name = "FAILED.json" if (out / "FAILED.json").exists() else "metrics.json"
    return out, json.loads((out / name).read_text())


def assert_failed_record(out: Path, rec: dict, etype: str, needles: tuple) -> None:
    assert rec["status"] == "failed", f"expected a FAILED record, got status {rec['status']}"
    assert not (out / "metrics.json").exists(), "a failed job must not leave metrics.json"
    if etype in ENV_FAULTS:
        assert not (out / "done").exists() and rec["kind"] == "environment" and rec["retry"] is True
    else:
        assert (out / "done").read_text() == "failed\n" and rec["kind"] == "config" and rec["retry"] is False
    assert rec["error"]["type"] == etype, rec["error"]
    for n in needles:
        assert n in rec["error"]["message"], rec["error"]["message"]
    assert not list(out.parent.glob(".*tmp*")), "temporary job folder left behind"
    from rex.pipeline.aggregate import summary_rows

    rows = summary_rows({**rec, "dir": str(out)})
    assert rows and {r["status"] for r in rows} == {"failed"} and {r["value"] for r in rows} == {""}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_job_bad_input(bad, tmp_path, case):
    extra, etype, needles = JOB_CASES[case]
    out, rec = run_job(bad, tmp_path, extra, expect_rc=ENV_FAULTS.get(etype, 0))
    assert_failed_record(out, rec, etype, needles)


@pytest.mark.parametrize("case", list(APPENDED_KEY_CASES))
def test_job_bad_input_appended_keys(bad, tmp_path, case):
    extra, etype, needles = APPENDED_KEY_CASES[case]
    out, rec = run_job(bad, tmp_path, extra, expect_rc=ENV_FAULTS.get(etype, 0))
    assert_failed_record(out, rec, etype, needles)


@pytest.mark.parametrize("case", ["unknown top-level key", "truncated checkpoint"])
def test_job_bad_input_subprocess(bad, tmp_path, case):
    """The real entry point: exit 0 (the table shows the failure) for a configuration failure, 75 (retried)
    for a corrupt checkpoint; FAILED.json with the message, no metrics.json."""
    extra, etype, needles = JOB_CASES[case]
    out, rec = run_job(bad, tmp_path, extra, subprocess_=True, expect_rc=ENV_FAULTS.get(etype, 0))
    assert_failed_record(out, rec, etype, needles)


def test_job_good_input_control(bad, tmp_path):
    # the folder is the label of what runs (a mismatch is refused: test_job_folder_label_must_match_what_runs)
    out, rec = run_job(bad, tmp_path, ["method.budget=1.5"], label="method=rex,w=4,a=8,K=2,budget=1.5")
    assert rec["status"] == "ok" and (out / "metrics.json").exists() and not (out / "FAILED.json").exists()
    assert rec["n"] == 20 and set(rec["metrics"]) == {"top1", "top5", "agreement", "kl"}


# ------------------------------------------------------------------------------- grid (Snakemake, -n)

def _grid_file(tmp_path: Path, mutate) -> Path:
    cfg = yaml.safe_load((ROOT / "conf/grid/smoke.yaml").read_text())
    mutate(cfg)
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _dry_run(tmp_path: Path, grid: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(grid),
                           "--config", f"results_dir={tmp_path / 'results'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case, mutate, needles", [
    ("unknown model", lambda c: c["models"][0].update(model="nosuch"), ("model=nosuch", "known:")),
    ("wrong type", lambda c: c.update(job_threads="two"), ("job_threads", "two")),
    ("unknown protocol key", lambda c: c["protocol"].update(mdoe="int"), ("mdoe",)),
    ("missing grid file", None, ("nosuch_grid.yaml",)),
])
def test_grid_bad_input(tmp_path, case, mutate, needles):
    grid = _grid_file(tmp_path, mutate) if mutate else ROOT / "conf/grid/nosuch_grid.yaml"
    r = _dry_run(tmp_path, grid)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for n in needles:
        assert n in out, out[-3000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("case, mutate, needles", [
    ("unknown method", lambda c: c["methods"][0].update(method="nosuch"), ("method=nosuch",)),
    ("bit-width out of range", lambda c: c["methods"][0].update(bits=[[17, 8]]), ("17",)),
    ("unknown top-level key", lambda c: c.update(reslts_dir="/tmp/x"), ("reslts_dir",)),
])
def test_grid_bad_input_strict(tmp_path, case, mutate, needles):
    r = _dry_run(tmp_path, _grid_file(tmp_path, mutate))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for n in needles:
        assert n in out, out[-3000:]
