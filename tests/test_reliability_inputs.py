"""Issue 13 items 5-8: mismatches, odd models and damaged files get a one-line answer naming the problem and the
fix, never a silent number or a traceback from deep inside torch."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import rex
from rex.errors import ConfigError, RexError, UnknownNameError, WeightError
from rex.paths import PROJECT_ROOT as ROOT


def _net(c: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


EX = torch.zeros(1, 3, 16, 16)


# ------------------------------------------------------------------ 5. input_range

@pytest.mark.parametrize("bad", [(float("nan"), 1.0), (5.0, -5.0), (0.0, 0.0), (-math.inf, math.inf), (1.0,),
                                 ("a", "b")])
def test_input_range_is_validated(bad):
    with pytest.raises(ConfigError, match="input_range"):
        rex.quantize(_net(), method="rtn", wbits=8, abits=8, example_input=EX, input_range=bad)


def test_good_input_range_still_quantizes():
    q = rex.quantize(_net(), method="rtn", wbits=8, abits=8, example_input=EX, input_range=(-2, 2.5))
    assert torch.isfinite(q(torch.randn(2, 3, 16, 16))).all()


# ------------------------------------------------------------------ 5. classes / channels / label vs what runs

def test_classifier_on_a_dataset_of_other_classes_is_refused_before_loading(monkeypatch):
    from rex import runner

    monkeypatch.setattr(runner, "_load", lambda *a, **k: pytest.fail("the model must not load"))
    spec = rex.QuantSpec(method="rtn", wbits=8, abits=8)
    with pytest.raises(ConfigError, match=r"mobilenet_v2.*1000 classes.*fashion_mnist.*10"):
        runner.classification_job("mobilenet_v2", spec, dataset="fashion_mnist", limit=4)
    with pytest.raises(ConfigError, match=r"resnet20_fmnist.*10 classes.*imagenet_sample.*1000"):
        runner.classification_job("resnet20_fmnist", spec, dataset="imagenet_sample", limit=4)
    with pytest.raises(UnknownNameError, match="dataset 'imagenet_smaple'"):  # item 7: names first
        runner.classification_job("mobilenet_v2", spec, dataset="imagenet_smaple", limit=4)


def test_channel_mismatch_names_both_sides():
    from rex.runner import check_channels

    with pytest.raises(ConfigError, match=r"1-channel images.*takes 3 channels"):
        check_channels("mobilenet_v2", torch.zeros(1, 3, 224, 224), "fashion_mnist", [(torch.zeros(1, 28, 28), 0)])
    check_channels("resnet20_fmnist", torch.zeros(1, 1, 28, 28), "fashion_mnist", [(torch.zeros(1, 28, 28), 0)])


def test_cli_refuses_the_mismatch_with_exit_2():
    r = subprocess.run([sys.executable, "-m", "rex", "quantize", "--model", "mobilenet_v2", "--dataset",
                        "fashion_mnist", "--limit", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "1000 classes" in r.stderr and "fashion_mnist" in r.stderr


@pytest.mark.slow
def test_job_folder_label_must_match_what_runs(tmp_path):
    """A folder labelled w=8 whose config says method.wbits=4 is a config failure naming both labels."""
    out = tmp_path / "runs" / "classification" / "resnet20_fmnist" / "method=rtn,w=8,a=8,K=1"
    w = tmp_path / "w.pt"
    torch.save(_fmnist_state(), w)
    r = subprocess.run([sys.executable, "-m", "rex.pipeline.job", "--out", str(out), "--no-mlflow",
                        "model=resnet20_fmnist", "dataset=fashion_mnist", "evaluation=classification",
                        "evaluation.limit=4", f"model.weights={w}", "method=rtn", "method.wbits=4", "method.abits=8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    rec = json.loads((out / "FAILED.json").read_text())
    assert rec["kind"] == "config" and rec["error"]["type"] == "ConfigError", r.stderr[-2000:]
    assert "'method=rtn,w=8,a=8,K=1'" in rec["error"]["message"] and "'method=rtn,w=4,a=8,K=1'" in rec["error"]["message"]
    assert not (out / "metrics.json").exists()


def _fmnist_state():
    from rex.models.small import BUILDERS

    torch.manual_seed(0)
    return BUILDERS["resnet20_fmnist"]().state_dict()


# ------------------------------------------------------------------ 6. dtypes, example inputs, damaged files

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_models_quantize_through_float32(dtype):
    ref = rex.quantize(_net(), method="rtn", wbits=8, abits=8, example_input=EX)
    m = _net().to(dtype)
    with pytest.warns(rex.api.DtypeWarning, match=str(dtype).replace("torch.", "")):
        q = rex.quantize(m, method="rtn", wbits=8, abits=8, example_input=EX.to(dtype))
    assert next(m.parameters()).dtype == dtype  # the input model is untouched
    x = torch.randn(2, 3, 16, 16)
    tol = 0 if dtype == torch.float64 else 0.1
    assert torch.allclose(q(x), ref(x), atol=tol), (q(x) - ref(x)).abs().max()
    assert any("float32 copy" in n for n in q.rex_info.notes)


def test_wrong_channels_example_input_names_the_expected_shape():
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 16, 16\).*expects 3 input channels.*\(1, 3, 224, 224\)"):
        rex.quantize(_net(), method="rtn", wbits=8, abits=8, example_input=torch.zeros(1, 1, 16, 16))


def test_truncated_metrics_json_names_the_file(tmp_path):
    from rex.pipeline import aggregate

    d = tmp_path / "runs" / "classification" / "m" / "method=rtn,w=8,a=8,K=1"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text('{"status": "ok", "metr')
    (d / "done").write_text("ok\n")
    r = subprocess.run([sys.executable, "-m", "rex.pipeline.aggregate", "--summary", str(tmp_path / "s.csv"),
                        "--jobs", str(tmp_path / "j.csv"), str(d / "done")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(d / "metrics.json") in r.stderr and "delete" in r.stderr
    with pytest.raises(aggregate.RecordError):
        aggregate.read_record(d)


def test_results_dir_that_is_a_file(tmp_path):
    from rex.pipeline import grid

    f = tmp_path / "results"
    f.write_text("")
    with pytest.raises(grid.GridError, match="is a file, not a folder"):
        grid.results_dir({"results_dir": str(f)}, ROOT)


def test_bench_out_unwritable_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    outs = ["/proc/rex/bench.json", str(tmp_path)] + ([] if os.geteuid() == 0 else [str(ro / "x" / "b.json")])
    try:
        for out in outs:  # under a system path, a folder, a read-only folder (root writes anywhere)
            r = subprocess.run([sys.executable, "-m", "rex", "bench", "--out", out, "--models", "resnet20_fmnist"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
            assert "--out" in r.stderr
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------ 7. weak messages

def test_negative_batchnorm_variance_is_named():
    m = _net()
    m[1].running_var[:3] = -0.5
    with pytest.raises(WeightError, match=r"BatchNorm '1'.*running_var has 3 negative.*variance cannot be negative"):
        rex.quantize(m, method="rtn", wbits=8, abits=8, example_input=EX)


def test_overflowing_weights_are_refused():
    m = _net()
    with torch.no_grad():
        m[5].weight[0, 0] = 1e37
    with pytest.raises(WeightError, match=r"parameter '5.weight'.*1e\+37.*overflow"):
        rex.quantize(m, method="rtn", wbits=8, abits=8, example_input=EX)


def test_unknown_grid_key_names_the_key_not_the_schema(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("models:\n  - {model: resnet20_fmnist, dataset: fashion_mnist, limt: 3}\n")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(g)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "unknown key 'limt' in models[0]; did you mean 'limit'?" in out, out[-2000:]
    assert len(out.splitlines()) < 40 and "$schema" not in out


# ------------------------------------------------------------------ 8. layers left float are counted and named

class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 8, 3)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):  # (N, 4, L)
        h = self.conv1d(x).transpose(1, 2)
        h, _ = self.lstm(h)
        return self.fc(h[:, -1])


def test_layers_left_float_are_counted_and_named():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = rex.quantize(_Mixed().eval(), method="rtn", wbits=8, abits=8, example_input=torch.randn(1, 4, 10))
    floats = q.rex_info.extra["float_layers"]
    assert floats.get("LSTM") == ["lstm"], floats
    assert "fc" not in sum(floats.values(), [])
    assert any(issubclass(x.category, rex.api.FloatLayersWarning) and "lstm" in str(x.message) for x in w)
    assert any("left float" in n and "LSTM" in n for n in q.rex_info.notes)


def test_a_model_of_only_unquantized_layer_types_names_them():
    # Conv3d is quantized now (tests/test_convnd.py); a transposed 3-d convolution still is not
    m = nn.Sequential(nn.ConvTranspose3d(1, 2, 3), nn.ReLU(), nn.ConvTranspose3d(2, 2, 3))
    with pytest.raises(RexError, match=r"ConvTranspose3d x2 \(0, 2\)"):
        rex.quantize(m, method="rtn", wbits=8, abits=8, example_input=torch.zeros(1, 1, 4, 4, 4))


def test_float_layers_reach_the_job_record():
    from rex import runner

    spec = rex.QuantSpec(method="rtn", wbits=8, abits=8)
    out: dict = {}
    runner._quantize_into(out, _Mixed().eval(), spec, torch.randn(1, 4, 10), None)
    assert out["float_layers"] >= 1 and "LSTM" in out["float_layer_names"]


class _Payload:
    """A class a checkpoint's pickle would have to import."""


def test_fastestdet_and_espnet_checkpoint_errors_never_relay_weights_only_false(tmp_path):
    """A pickle holding Python objects is refused; the message explains why and never passes on torch's advice
    to retry with weights_only=False."""
    from rex.errors import CheckpointError
    from rex.models.fastestdet import load_state_dict_checked

    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload()}, evil)  # a pickled Python object: weights_only loading refuses it
    for p in (evil, tmp_path / "trunc.pt"):
        if p.name == "trunc.pt":
            torch.save(nn.Linear(2, 2).state_dict(), p)
            p.write_bytes(p.read_bytes()[:50])
        with pytest.raises(CheckpointError) as e:
            load_state_dict_checked(nn.Linear(2, 2), p, None, "ESPNet-CamVid")
        msg = str(e.value)
        assert "ESPNet-CamVid" in msg and "False" not in msg and "safe_globals" not in msg, msg
