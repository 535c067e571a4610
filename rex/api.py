"""The public verbs: quantize, bops, report, expand.

``quantize`` checks what a user hands it before anything runs, so that a daily mistake gets a one-line
``rex.errors`` message instead of a traceback from deep inside torch: the input range (two finite numbers,
low < high), the model's dtype (float16 / bfloat16 / float64 models are quantized through a float32 copy, with
a warning), BatchNorm statistics (a negative running variance is named as such), weight magnitudes where
float32 arithmetic would overflow, and the example input (it must run through the model; a wrong channel count
names the shape the first layer expects). Afterwards every layer with a matrix or convolution weight that was
not quantized (LSTM, GRU, an attention's packed projection, ConvTranspose3d, ...) is counted and named in
``qmodel.rex_info.extra["float_layers"]``, in ``rex_info.notes`` and in a ``FloatLayersWarning``; layers kept
float by the first/last policy are not "left float".
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Optional

import torch
from torch import nn

from .cost import _call
from .cost import bops as _bops
from .errors import ConfigError, RexWarning, WeightError
from .cost import cost_table, model_size_bits, order1_bops
from .expansion import expand  # noqa: F401  (re-exported)
from .methods import get_method
from .nn.layers import QuantLayer
from .spec import QuantSpec


def quantize(
    model: nn.Module,
    spec: Optional[QuantSpec] = None,
    example_input=None,
    input_range: Optional[tuple[float, float]] = None,
    **spec_kwargs,
) -> nn.Module:
    """Quantize ``model`` without data and return a new model (the input is left untouched).

    ``rex.quantize(model, rex.QuantSpec(method="rex", wbits=4, order=2, budget=1.5))`` or
    ``rex.quantize(model, method="rex", wbits=4, order=2, budget=1.5)``. ``example_input`` fixes the input
    shape used for tracing and BOPs (default 1x3x224x224); its values are never used to set anything.
    ``input_range`` is the range of the network input (e.g. from its normalisation), used to quantize the
    first layer's input; without it the first layer's input stays float.
    """
    if spec is None:
        spec = QuantSpec(**spec_kwargs)
    elif spec_kwargs:
        spec = spec.replace(**spec_kwargs)
    fn = get_method(spec.method)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() needs a torch.nn.Module, got {type(model).__name__}")
    input_range = check_input_range(input_range)
    model, example_input, dtype_note = as_float32(model, example_input)
    check_batchnorm_stats(model)
    check_weight_magnitude(model)
    if example_input is not None:
        check_example_input(model, example_input)
    try:
        qmodel = fn(model, spec, example_input=example_input, input_range=input_range)
    except ConfigError as exc:
        floats = float_layers(model)
        if "nothing to quantize" not in str(exc) or not floats:
            raise
        raise ConfigError(f"{exc}; the model's weight layers are of types rex does not quantize: " + "; ".join(
            f"{kind} x{len(names)} ({', '.join(names[:4])})" for kind, names in sorted(floats.items()))) from None
    info = getattr(qmodel, "rex_info", None)
    notes = [dtype_note] if dtype_note else []
    floats = float_layers(qmodel, skip=planned_float(info))
    if floats:
        n = sum(len(v) for v in floats.values())
        notes.append(f"{n} layer(s) left float (not quantized, not in the quantized BOPs): " + "; ".join(
            f"{kind} x{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            for kind, names in sorted(floats.items())))
        warnings.warn(notes[-1], FloatLayersWarning, stacklevel=2)
    if info is not None:
        info.notes.extend(notes)
        info.extra["float_layers"] = floats
    return qmodel


class FloatLayersWarning(RexWarning):
    """Some layers with a weight matrix or convolution kernel were left float (their type is not quantized)."""


class DtypeWarning(RexWarning):
    """A float16 / bfloat16 / float64 model was quantized through a float32 copy."""


def check_input_range(input_range) -> Optional[tuple[float, float]]:
    """``(low, high)``: two finite numbers, low < high (None: the first layer's input stays float)."""
    if input_range is None:
        return None
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ConfigError(f"input_range must be (low, high), two numbers, got {input_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"input_range must be finite, got {input_range!r}: give the range of the normalised "
                          "network input, e.g. (-2.12, 2.64) for ImageNet normalisation, or None to keep the "
                          "first layer's input float")
    if not lo < hi:
        raise ConfigError(f"input_range must be (low, high) with low < high, got {input_range!r}")
    return lo, hi


def as_float32(model: nn.Module, example_input):
    """(model, example_input, note): a float32 copy of a float16 / bfloat16 / float64 model (scales and
    rounding are computed in float32; the quantized model runs in float32), else the model itself."""
    dtypes = {p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()}
    other = sorted(str(d).replace("torch.", "") for d in dtypes - {torch.float32})
    note = None
    if other:
        note = (f"the model is {'/'.join(other)}: quantized through a float32 copy (scales, rounding and the "
                "quantized model are float32; feed it float32 inputs)")
        warnings.warn(note, DtypeWarning, stacklevel=3)
        model = copy.deepcopy(model).float()
    if isinstance(example_input, torch.Tensor) and example_input.is_floating_point() \
            and example_input.dtype != torch.float32:
        example_input = example_input.float()
    return model, example_input, note


def check_batchnorm_stats(model: nn.Module) -> None:
    """A BatchNorm's running variance must be >= 0 (folding divides by its square root)."""
    for name, m in model.named_modules():
        var = getattr(m, "running_var", None)
        if isinstance(m, nn.modules.batchnorm._NormBase) and isinstance(var, torch.Tensor):
            bad = var.detach() + m.eps < 0
            if bool(bad.any()):
                raise WeightError(f"BatchNorm {name or '<model>'!r}: running_var has {int(bad.sum())} negative "
                                  f"value(s) of {var.numel()} (min {float(var.min()):.4g}); a variance cannot be "
                                  "negative: the checkpoint is corrupt or was edited. Nothing was quantized.")


# Above this magnitude a product of two float32 values can overflow (sqrt of float32's max, ~1.8e19).
MAX_WEIGHT = math.sqrt(torch.finfo(torch.float32).max)


def check_weight_magnitude(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.numel() and torch.isfinite(p).all():
            top = float(p.detach().abs().max())
            if top > MAX_WEIGHT:
                raise WeightError(f"parameter {name!r} has values up to {top:.3g}: beyond {MAX_WEIGHT:.2g} the "
                                  "float32 arithmetic of quantization (scales, products, the error against FP32) "
                                  "overflows to Inf/NaN; check the checkpoint (a diverged training run?) or "
                                  "rescale the layer. Nothing was quantized.")


def check_example_input(model: nn.Module, example_input) -> None:
    """Run the float model once on ``example_input``; a failure names the shape the first layer expects."""
    first: list = []

    def hook(mod, args):
        if not first:
            first.append(mod)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, example_input)  # a tuple is positional arguments, a dict keyword arguments
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input)
        expect = ""
        layer = first[0] if first else next((m for m in model.modules() if isinstance(
            m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
        if isinstance(layer, nn.Conv2d):
            expect = f"; its first layer (Conv2d) expects {layer.in_channels} input channels: (N, " \
                     f"{layer.in_channels}, H, W), e.g. torch.zeros(1, {layer.in_channels}, 224, 224)"
        elif isinstance(layer, nn.Linear):
            expect = f"; its first layer (Linear) expects inputs of shape (..., {layer.in_features})"
        elif isinstance(layer, (nn.Conv1d, nn.Conv3d)):
            expect = f"; its first layer ({type(layer).__name__}) expects {layer.in_channels} input channels"
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the model does not run on example_input of shape {shape} ({msg}){expect}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


# Modules whose 2-D weight is a lookup table, not a matrix product: never "left float".
_LOOKUP = (nn.Embedding, nn.EmbeddingBag)


def planned_float(info) -> set:
    """Names of weight layers that are float on purpose, not for want of support: kept float by the first/last
    policy (``first_last='fp'``: planned, costed at 32 x 32 in the BOPs, stated in the protocol; HQQ lists them in
    ``extra['float_by_policy']``)."""
    if info is None:
        return set()
    return {p.name for p in getattr(info, "plans", []) if not p.quantize} | set(info.extra.get("float_by_policy") or ())


def float_layers(qmodel: nn.Module, skip=()) -> dict:
    """{layer type: [names]} of the modules of a quantized model that hold a matrix or convolution weight
    (a parameter of 2 or more dimensions) and were not quantized, except the names in ``skip``
    (``planned_float``). Norm layers (1-D weights) and embeddings are not counted."""
    out: dict = {}
    skip = set(skip)

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QuantLayer) or full in skip:
                continue
            if not isinstance(child, _LOOKUP) and any(
                    p.dim() >= 2 for p in child.parameters(recurse=False)):
                out.setdefault(type(child).__name__, []).append(full)
            walk(child, full)

    if not isinstance(qmodel, (QuantLayer, *_LOOKUP)) and any(p.dim() >= 2 for p in qmodel.parameters(recurse=False)):
        out.setdefault(type(qmodel).__name__, []).append("<model>")  # the model itself is one such layer (an nn.GRU)
    walk(qmodel, "")
    return out


def bops(model: nn.Module, example_input=None) -> int:
    """BOPs per sample of a float (32x32) or quantized model."""
    if example_input is None:
        from .engine import default_example_input

        example_input = default_example_input(model)
    return _bops(model, example_input)


def report(qmodel: nn.Module) -> list[dict]:
    """Per quantized layer: name, kind, role, bits, order, densities, measured max error and its bound,
    activation range and source, int32 safety."""
    rows = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, QuantLayer):
            continue
        rows.append(
            dict(
                name=name,
                kind=type(m.inner).__name__,
                role=getattr(m, "role", ""),
                wbits=m.wbits,
                abits=m.abits,
                order=m.order,
                densities=[round(d, 4) for d in m.densities],
                max_err=getattr(m, "max_err", None),
                bound=getattr(m, "bound_max", None),
                bound_ok=getattr(m, "bound_ok", None),
                act_range=None if m.act is None else (round(m.act.lo, 4), round(m.act.hi, 4)),
                act_signed=None if m.act is None else m.act.signed,
                int32_safe=m.int32_safe(),
            )
        )
    return rows


def activation_coverage(qmodel: nn.Module) -> dict:
    """Which layer inputs the quantized model really quantizes, and where their ranges come from, so that a
    result row never claims activations it did not quantize (a "W4A4" row whose layers saw float inputs).

    ``act_float`` counts the layers whose input stays float although the spec asks for ``abits`` (no
    data-free range, or the first/last policy left the layer float); ``act_layers`` counts all planned layers.
    Activations are quantized at layer inputs only: residual adds, pooling and concatenations run in float,
    in integer-exact mode too (``act_points``)."""
    info = getattr(qmodel, "rex_info", None)
    if info is None:
        raise TypeError("activation_coverage needs a model returned by rex.quantize (it reads model.rex_info)")
    plans = info.plans
    # the engine's count (rex_info.extra["float_inputs"]) leaves out embeddings, whose input is token ids
    fi = info.extra.get("float_inputs") or dict(count=sum(p.abits is None for p in plans), of=len(plans),
                                                 names=[p.name for p in plans if p.abits is None])
    if info.spec.abits is None:
        return dict(act_layers=fi["of"], act_float=fi["of"], act_float_layers=[],
                    act_ranges="none (weight-only)", act_propagated=0, act_points="none")
    floats = list(fi["names"])
    norm = "LayerNorm" if any(isinstance(m, nn.LayerNorm) for m in qmodel.modules()) else "BatchNorm"
    source = ("distilled data (ZeroQ)" if "zeroq" in info.extra
              else "uniform-noise batch (SQuant: sigma x std)" if info.spec.act_range == "noise"
              else f"{norm} statistics (beta + n|gamma|)")
    # inputs whose range was derived through a preceding weight layer (QuantSpec.range_propagation)
    propagated = [p for p in plans if p.abits is not None and p.range_source]
    if propagated:
        how = " / ".join(sorted({p.range_source for p in propagated}))
        source += f"; {how} through the preceding layer for {len(propagated)} inputs"
    if plans and plans[0].abits is not None:
        source += "; network input from its normalisation"
    return dict(act_layers=fi["of"], act_float=len(floats), act_float_layers=floats, act_ranges=source,
                act_propagated=len(propagated), act_points="layer inputs (adds, pooling, concatenation in float)")


def summary(qmodel: nn.Module, example_input=None) -> dict:
    """Model-level numbers: BOPs, MACs, size, and the quantization time; ``plain_bops``: the BOPs of the same
    spec at order 1 without a budget (``rex.cost.order1_bops``), the base of a budget ratio."""
    if example_input is None:
        from .engine import default_example_input

        example_input = default_example_input(qmodel)
    table = cost_table(qmodel, example_input)
    info = getattr(qmodel, "rex_info", None)
    return dict(
        bops=sum(r.bops for r in table),
        plain_bops=order1_bops(table),
        macs=sum(r.macs for r in table),
        size_bits=model_size_bits(qmodel),
        layers=len(table),
        quant_seconds=None if info is None else info.seconds,
    )
