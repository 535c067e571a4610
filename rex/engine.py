"""The quantization engine every method goes through: prepare -> trace -> plan -> allocate -> swap.

1. deep-copy the model (the input is never touched), check that every weight is finite;
2. fold BatchNorm (its beta/gamma become the per-channel output statistics of the conv);
3. the method's transforms, in order (DFQ equalization, OCS splitting, ...: ``rex.transforms.base``);
4. the recorded op graph (``rex.graph``): execution order of the weight layers, input shapes, data-free ranges;
5. plan per layer (first/last-layer policy): weight bits, activation bits, maximum order;
6. allocate the sparse orders under the budget (uniform or greedy), choose neurons by residual norm;
7. expand each weight and swap in a QuantLayer.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import nn

from .cost import module_macs, weight_memory
from .errors import ConfigError, Int32OverflowWarning, WeightError
from .expansion import (
    LayerCost,
    allocate_greedy,
    allocate_uniform,
    expand_terms,
    group_max_error,
    masks_from_norms,
    reconstruct,
    residual_norms,
    select_masks,
    sparse_from_dense,
)
from .nn.layers import ActQuantizer, QuantLayer, canonical_weight, is_conv, is_embedding, is_quantizable, make_quant_layer
from .quant import WeightQuantizer, check_finite, quantize_bias, round_nearest
from .quant.threads import quant_threads
from .trace import TraceResult, ranges
from .transforms import Context, FoldBatchNorm, Transform, finish_transforms, get_module, set_module, run_transforms

if TYPE_CHECKING:  # annotations only: the engine does not import the spec (spec -> methods -> engine)
    from .spec import QuantSpec

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)

QuantizerFactory = Callable[[int, str], WeightQuantizer]  # (bits, layer name) -> operator


@dataclass
class LayerPlan:
    name: str
    wbits: int
    abits: Optional[int]
    order: int
    macs: int
    channels: int
    input_range: Optional[tuple[float, float]]
    role: str  # first | last | body
    quantize: bool = True
    range_source: Optional[str] = None  # "propagated (moments)" etc. when derived through a preceding layer


@dataclass
class QuantInfo:
    """Attached to a quantized model as ``model.rex_info``."""

    spec: QuantSpec
    plans: list[LayerPlan] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)  # transform name -> its summary (rex.transforms.base)


def check_model_weights(model: nn.Module) -> None:
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point():
            try:
                check_finite(p, f"parameter {name!r}")
            except WeightError as e:
                raise WeightError(f"{e}. Nothing was quantized.") from None


QUANTIZED_KINDS = "Conv1d, Conv2d, Conv3d, ConvTranspose2d, Linear, Hugging Face Conv1D or Embedding"


def default_example_input(model: nn.Module) -> torch.Tensor:
    """An input for the first Conv2d (1 x C x 224 x 224) or Linear (1 x features) of ``model``. A Conv1d or
    Conv3d model has no customary input size (a sequence length, a clip length): its MACs and BOPs depend on
    it, so it must be given."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return torch.zeros((1, m.in_channels, *DEFAULT_INPUT_SHAPE[2:]))
        if isinstance(m, (nn.Conv1d, nn.Conv3d)):
            dims = "L" if isinstance(m, nn.Conv1d) else "D, H, W"
            eg = "128" if isinstance(m, nn.Conv1d) else "16, 112, 112"
            raise ConfigError(f"the model's first layer is a {type(m).__name__}: pass example_input of shape "
                              f"(N, {m.in_channels}, {dims}), e.g. torch.zeros(1, {m.in_channels}, {eg}); its size "
                              "sets the MACs and BOPs")
        if isinstance(m, nn.Linear):
            return torch.zeros((1, m.in_features))
    raise ConfigError(f"model has no {QUANTIZED_KINDS} layer: nothing to quantize")


def layer_filter(name: str, m: nn.Module) -> bool:
    """The modules the engine quantizes (``rex.nn.layers.is_quantizable``), for the tracer."""
    return is_quantizable(m) and not getattr(m, "_rex_wrapped", False)


def layer_roles(model: nn.Module, order: list[str]) -> dict[str, str]:
    """first | last | body for the first/last-layer policy. Embeddings read the network input (ids): they
    are the first layers, and then the first Linear (which reads a normalised embedding) is a body layer;
    without embeddings the first weight layer in execution order is the first. The last weight layer that
    is not an embedding (a classifier, an LM head) is the last."""
    emb = {n for n in order if is_embedding(get_module(model, n))}
    rest = [n for n in order if n not in emb]
    roles = {n: "first" for n in emb}
    for i, n in enumerate(rest):
        roles[n] = "first" if i == 0 and not emb else "last" if i == len(rest) - 1 else "body"
    return roles


def module_order_trace(model: nn.Module) -> TraceResult:
    """A weight-only plan without a forward pass: the quantizable layers in registration order, shapes of
    one token (so MACs are per token: a Linear costs in x out, an Embedding 0). Used when a weight-only
    spec (abits=None) gets no example input and the model has no convolution (whose MACs need a spatial
    size) and no BatchNorm (whose folding needs the data flow)."""
    tr = TraceResult()
    # nn.MultiheadAttention reads its out_proj's weight directly (F.multi_head_attention_forward), never calling
    # the Linear: a swapped QuantLayer there would break its forward; the traced plan never sees it either
    inside_mha = {f"{n}.out_proj" if n else "out_proj" for n, mod in model.named_modules()
                  if isinstance(mod, nn.MultiheadAttention)}
    for name, mod in model.named_modules():
        if not layer_filter(name, mod) or name in inside_mha:
            continue
        w = canonical_weight(mod)
        tr.order.append(name)
        tr.input_range[name] = None
        tr.input_shape[name] = (1, 1) if is_embedding(mod) else (1, int(w.shape[1]))
        tr.output_shape[name] = (1, 1, int(w.shape[1])) if is_embedding(mod) else (1, int(w.shape[0]))
        tr.calls[name] = 1
    return tr


def _needs_forward(model: nn.Module) -> bool:
    return any(is_conv(x) or isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules())


def end_policy(spec: QuantSpec, role: str) -> tuple[Optional[str], Optional[str]]:
    """(layer policy, input policy) of a layer of ``role``: body layers have none; the first / last layer
    takes first_layer / last_layer (else first_last) and first_input / last_input (None: as its policy)."""
    if role == "first":
        return spec.first_layer or spec.first_last, spec.first_input
    if role == "last":
        return spec.last_layer or spec.first_last, spec.last_input
    return None, None


def plan_layers(model: nn.Module, tr, spec: QuantSpec) -> list[LayerPlan]:
    plans = []
    roles = layer_roles(model, tr.order)
    for name in tr.order:
        m = get_module(model, name)
        role = roles[name]
        wbits, abits, order, quant = spec.wbits, spec.abits, spec.order, True
        policy, input_policy = end_policy(spec, role)
        if policy == "8bit":
            wbits, order = max(8, spec.wbits), 1
            abits = None if spec.abits is None else max(8, spec.abits)
        elif policy == "fp":
            quant, abits, order = False, None, 1
        if quant and input_policy == "float":
            abits = None  # the protocol leaves this input float (SQuant, ZeroQ: the first layer's)
        elif quant and input_policy == "8bit" and spec.abits is not None:
            abits = max(8, spec.abits)
        rng = tr.input_range.get(name)
        if rng is None or is_embedding(m):
            abits = None  # no data-free range: input left in float (recorded); an Embedding reads ids
        plans.append(LayerPlan(name, wbits, abits, order, module_macs(m, tr.input_shape[name], tr.output_shape.get(name, ())),
                               canonical_weight(m).shape[0], rng, role, quant,
                               tr.input_source.get(name) if abits is not None else None))
    return plans


def _row_independent(q: WeightQuantizer) -> bool:
    """Plain per-channel symmetric round-to-nearest: each output channel is quantized on its own, so a
    group-sparse expansion can be assembled from the dense one (``sparse_from_dense``)."""
    return (type(q) is WeightQuantizer and q.symmetric and q.granularity in ("per_channel", "per_group")
            and q.rounding is round_nearest)


def _allocate(model, plans, spec, quantizer_factory, dense: dict) -> dict[str, list[int]]:
    """Rows per order for every layer. Greedy allocation needs each layer's dense expansion; it is kept in
    ``dense`` (name -> (terms, norms)) so that the layer is not expanded again when it is swapped."""
    costs = []
    for p in plans:
        if not p.quantize:
            continue
        lc = LayerCost(p.name, p.macs, p.wbits, p.abits or 32, p.channels, p.order)
        if spec.allocation == "greedy" and p.order > 1 and spec.budget is not None:
            w = canonical_weight(get_module(model, p.name))
            terms = expand_terms(w, quantizer_factory(p.wbits, p.name), p.order, name=p.name)
            norms = residual_norms(terms, w)  # [K+1, C]
            dense[p.name] = (terms, norms)
            gains = (norms[1:-1] - norms[2:]) / norms[0].sum().clamp(min=1e-30)
            lc.gains = gains
        costs.append(lc)
    if spec.budget is None:
        return {p.name: [p.channels] * (p.order - 1) for p in plans if p.order > 1}
    # a layer without MACs (an Embedding's lookup) costs no BOPs: its orders are dense, outside the budget
    free = {lc.name: [lc.channels] * (lc.order - 1) for lc in costs if lc.macs == 0 and lc.order > 1}
    fn = allocate_greedy if spec.allocation == "greedy" else allocate_uniform
    return {**fn([lc for lc in costs if lc.name not in free], spec.budget, spec.order), **free}


def _layer_terms(w, q, p, counts, criterion, dense: dict):
    """The expansion of one layer: dense, or group-sparse with ``counts`` rows per order >= 2."""
    dense_ok = all(n >= p.channels for n in counts) and len(counts) == p.order - 1
    if p.order == 1 or dense_ok:
        return dense[p.name][0] if p.name in dense else expand_terms(w, q, p.order, name=p.name)
    if _row_independent(q):  # one quantization pass per order instead of three
        terms, norms = dense.get(p.name) or (None, None)
        if terms is None:
            terms = expand_terms(w, q, p.order, name=p.name)
            norms = residual_norms(terms, w)
        return sparse_from_dense(terms, masks_from_norms(norms, counts, criterion))
    masks = select_masks(w, q, p.order, counts, criterion)
    return expand_terms(w, q, p.order, masks, name=p.name)


def quantize_model(model: nn.Module, spec: QuantSpec, example_input=None, *args, **kwargs) -> nn.Module:
    """Quantize ``model`` under ``spec`` (steps 1-7 above) and return the quantized copy with ``rex_info``.

    The math runs single-threaded (``rex.quant.threads``: thread contention made a 2-thread run ~10x
    slower than a 1-thread one on a loaded machine); the caller's torch thread count is restored."""
    with quant_threads():
        m = _quantize_model(model, spec, example_input, *args, **kwargs)
        m.rex_info.extra["quant_threads"] = torch.get_num_threads()
    return m


def _quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    example_input=None,
    input_range: Optional[tuple[float, float]] = None,
    *,
    quantizer_factory: Optional[QuantizerFactory] = None,
    transforms: Optional[Sequence[Transform]] = None,
    range_override: Optional[dict[str, tuple[float, float]]] = None,
    inplace: bool = False,
) -> nn.Module:
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() needs a torch.nn.Module, got {type(model).__name__}")
    check_model_weights(model)
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    info = QuantInfo(spec)
    no_forward = example_input is None and spec.abits is None and not _needs_forward(m)
    if example_input is None and not no_forward and any(is_embedding(x) for x in m.modules()):
        raise ConfigError(
            "a model with an Embedding (a transformer) needs example_input for an activation-quantized spec: "
            "pass the model inputs, e.g. example_input=dict(input_ids=ids, attention_mask=mask) or a tuple; a "
            "weight-only spec (abits=None) needs none")
    ex = example_input if example_input is not None or no_forward else default_example_input(m)
    if spec.relu6 == "relu":
        info.extra["relu6_replaced"] = relu6_to_relu(m)
        if info.extra["relu6_replaced"]:
            info.notes.append(f"protocol relu6=relu: {len(info.extra['relu6_replaced'])} ReLU6 replaced by ReLU")
    ctx = Context(ex, layer_filter=layer_filter)
    fold = [FoldBatchNorm()] if spec.fold_bn else []
    if no_forward:
        if transforms:
            raise ConfigError(f"{spec.method} rewrites the model with transforms that trace it "
                              f"({', '.join(type(t).__name__ for t in transforms)}): pass example_input")
        tr = module_order_trace(m)
        info.extra["planned_from"] = "module order (no example input): MACs per token"
    elif transforms is None:
        # no preparation: one recording serves both folding and ranges: a BN's output range is the same whether it is
        # folded or not, and folding renames nothing
        tr = ranges(ctx.graph(m), sigma=spec.sigma, input_range=input_range, propagation=spec.range_propagation)
        run_transforms(m, fold, ctx)
        for conv, bn in ctx.folded:
            tr.output_range[conv] = tr.bn_output_range.get(bn)
    else:
        # a method's transforms (a list, even empty): the ranges come from the BN statistics they kept in step
        run_transforms(m, [*fold, *transforms], ctx)
        tr = ranges(ctx.graph(m), sigma=spec.sigma, input_range=input_range, output_stats=ctx.stats,
                    propagation=spec.range_propagation)
    info.folded = ctx.folded
    ctx.invalidate()  # the recording keeps every activation of the pass alive: not needed from here on
    if not tr.order:
        raise ConfigError(f"model has no {QUANTIZED_KINDS} layer reached by the example input: nothing to quantize")
    noise = None
    if spec.act_range == "noise" and spec.abits is not None:
        if range_override:
            raise ConfigError(f"{spec.method} sets its own activation ranges: act_range='noise' does not apply; "
                              "use act_range='bn' (or preset shared / zeroq) with it")
        noise = _noise_ranges(m, tr, spec, ex, info)
    if range_override:
        for k, v in range_override.items():
            tr.input_range[k] = v
            tr.input_source.pop(k, None)  # the override's own source (e.g. ZeroQ's distilled data)
    plans = plan_layers(m, tr, spec)
    if noise is not None:  # the clip below 6 bits depends on each layer's own bits (the last input's 8)
        from .noise_ranges import squant_range

        for p in plans:
            if p.abits is not None and p.abits != spec.abits and p.name in noise and p.name != tr.order[0]:
                p.input_range = squant_range(noise[p.name], spec.sigma_for(spec.abits), p.abits)
    if quantizer_factory is None:
        quantizer_factory = lambda bits, name: WeightQuantizer(bits, spec.symmetric, spec.granularity,  # noqa: E731
                                                               group_size=spec.group_size)
    dense: dict = {}
    counts = _allocate(m, plans, spec, quantizer_factory, dense)
    layers: list[QuantLayer] = []
    for p in plans:
        if not p.quantize:
            continue
        inner = get_module(m, p.name)
        w = canonical_weight(inner)  # output channels first (ConvTranspose2d is stored transposed)
        q = quantizer_factory(p.wbits, p.name)
        terms = _layer_terms(w, q, p, counts.get(p.name, []), spec.criterion, dense)
        dense.pop(p.name, None)
        act = None
        if p.abits is not None and p.input_range is not None:
            act = ActQuantizer(p.abits, p.input_range[0], p.input_range[1],
                               source="input" if p.role == "first" else
                               "noise" if spec.act_range == "noise" else p.range_source or "bn-propagated")
        rec = reconstruct(terms)
        layer = make_quant_layer(inner, terms, act, p.wbits, name=p.name, mode=spec.mode, dequantized=rec)
        # measured error vs the bound of method.md §2 at each row's effective order
        gs = terms[0].qt.group_size
        err = group_max_error(w, rec, gs)  # per row, or per (row, group)
        n_terms = torch.stack([t.mask for t in terms]).sum(0)
        if gs:
            n_terms = n_terms[:, None]  # sparse orders are chosen per output neuron: all its groups
        s1 = terms[0].qt.channel_scale(w.shape[0])  # order-1 scale per channel (per group: [C, G])
        bound = (s1 / 2) * float(2**p.wbits - 2) ** (-(n_terms.float() - 1))
        layer.max_err = float(err.max())
        layer.bound_max = float(bound.max())
        layer.bound_ok = bool((err <= bound * (1 + 1e-5) + 1e-12).all()) if spec.symmetric else None
        layer.role = p.role
        layer.out_range = tr.output_range.get(p.name)
        set_module(m, p.name, layer)
        layers.append(layer)
    info.plans = plans
    info.extra["memory"] = weight_memory(m)  # bits per weight incl. scales, zero points, sparse masks
    info.seconds = time.perf_counter() - t0
    # layer inputs left in float: every quantized layer but embeddings (their input is ids) whose input has
    # no activation quantizer, by design (weight-only spec) or for want of a data-free range
    floats = [p.name for p in plans if p.quantize and p.abits is None and not is_embedding(get_module(m, p.name).inner)]
    info.extra["float_inputs"] = dict(count=len(floats), of=sum(1 for p in plans if p.quantize and not
                                                                is_embedding(get_module(m, p.name).inner)),
                                      names=floats)
    by_protocol = [p.name for p in plans if p.name in floats and end_policy(spec, p.role)[1] == "float"]
    unq = [n for n in floats if n not in by_protocol] if spec.abits is not None else []
    if unq:
        info.notes.append(f"inputs left in float (no data-free range): {', '.join(unq)}")
    if by_protocol and spec.abits is not None:
        info.notes.append(f"inputs left in float by the protocol (first_input / last_input = float): "
                          f"{', '.join(by_protocol)}")
    if spec.abits is not None and tr.unknown_note():
        info.notes.append(tr.unknown_note())
    if spec.mode == "int":
        note = int32_note(layers)
        if note:
            info.notes.append(note)
            warnings.warn(note, Int32OverflowWarning, stacklevel=3)
    m.rex_info = info
    finish_transforms(m, transforms or (), ctx)
    info.transforms = ctx.info
    if spec.bias_bits is not None:  # after the transforms: DFQ's bias correction changes the biases first
        n = 0
        for layer in layers:
            b = getattr(layer.inner, "bias", None)
            if isinstance(b, torch.Tensor) and not layer.embedding:
                with torch.no_grad():
                    b.copy_(quantize_bias(b, spec.bias_bits))
                n += 1
        info.extra["bias_bits"] = dict(bits=spec.bias_bits, layers=n)
    return m


def relu6_to_relu(model: nn.Module) -> list[str]:
    """Every ReLU6 module of ``model`` becomes a ReLU, in place (DFQ's protocol: ReLU6 clips at 6, which
    equalization scales move; the paper replaces it everywhere). Returns the names replaced."""
    names = [n for n, x in model.named_modules() if type(x) is nn.ReLU6]
    for n in names:
        set_module(model, n, nn.ReLU(inplace=get_module(model, n).inplace))
    return names


def _noise_ranges(m: nn.Module, tr, spec: QuantSpec, ex, info: QuantInfo) -> dict:
    """SQuant's ranges (``rex.noise_ranges``) of every traced layer input, set in ``tr.input_range`` at the
    spec's bits; returns the statistics (the plan re-derives a layer's range at its own bits)."""
    from .noise_ranges import NOISE_BATCH, noise_input_stats, noise_shape, squant_range

    t0 = time.perf_counter()
    stats = noise_input_stats(m, noise_shape(ex), list(tr.order), seed=spec.seed)
    sigma = spec.sigma_for(spec.abits)
    for name in tr.order[1:]:  # the first layer reads the network input: its range is the normalisation's
        tr.input_range[name] = squant_range(stats[name], sigma, spec.abits)
        tr.input_source.pop(name, None)  # not propagated (range_propagation): measured under noise
    info.extra["act_range"] = dict(source="noise", batch=NOISE_BATCH, sigma=sigma, seed=spec.seed,
                                   seconds=round(time.perf_counter() - t0, 3))
    return stats


def int32_note(layers) -> str | None:
    """None when every layer's int32 accumulation is safe, else a message naming the unsafe layers."""
    unsafe = [(layer.layer_name, layer.accumulator_bound(), layer.wbits, layer.abits, layer.fan_in())
              for layer in layers if not layer.int32_safe()]
    if not unsafe:
        return None
    shown = "; ".join(f"{n} (W{w}A{a}, fan-in {f}: |acc| up to {b:.3g})" for n, b, w, a, f in unsafe[:8])
    more = f"; and {len(unsafe) - 8} more" if len(unsafe) > 8 else ""
    return (f"mode=int: int32 accumulation can overflow (bound > 2^31-1) in {len(unsafe)} layer(s): {shown}{more}. "
            "The simulation here stays exact (wider accumulators), but an int32 kernel would not; use fewer "
            "weight/activation bits for these layers (e.g. W8A8) or an int64 accumulator "
            "(rex.report(qmodel) lists int32_safe per layer)")
