"""QuantSpec: everything that changes a number, validated once, recorded with every result."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from . import labels
from . import protocols
from .errors import ConfigError, UnknownNameError
from .methods import did_you_mean as _did_you_mean
from .methods import method_config, method_names
from .quant import check_bits

ALLOCATIONS = ("uniform", "greedy")
GRANULARITIES = ("per_channel", "per_tensor", "per_group")
MODES = ("fake", "int")
FIRST_LAST = protocols.LAYER_POLICIES
CRITERIA = ("residual", "weight")
RANGE_PROPAGATIONS = ("none", "moments", "interval")  # rex.trace.LAYER_RANGE_RULES
FLOAT_BITS = 32

# Data-free activation range: max_c(beta_c + n |gamma_c|). Fewer bits -> clip harder (coarser grid), as
# in the analytical-clipping literature (ACIQ's Gaussian optima grow from ~1.7 sigma at 2 bits to ~4 at 8);
# per-tensor over many channels needs more headroom than a single Gaussian, hence the values below.
DEFAULT_ACT_SIGMA = {2: 2.0, 3: 2.5, 4: 3.0, 5: 3.5, 6: 4.0, 7: 5.0}
DEFAULT_ACT_SIGMA_HIGH = 6.0  # 8 bits and more


def default_act_sigma(abits: Optional[int]) -> float:
    if abits is None:
        return DEFAULT_ACT_SIGMA_HIGH
    return DEFAULT_ACT_SIGMA.get(abits, DEFAULT_ACT_SIGMA_HIGH)


@dataclass(frozen=True)
class QuantSpec:
    """A quantization configuration.

    method       registry name (``rex.methods.list_methods()``): rex, rtn, dfq, squant, ocs, zeroq, ...
    wbits        weight bit-width of each expansion term (2..16; 2 = ternary)
    abits        activation bit-width (2..16) or None/32 for float activations
    order        expansion order K (1 = plain quantization)
    budget       None (dense expansion) or a BOPs ratio >= 1 relative to plain W_b/A_a, or absolute BOPs
    allocation   'uniform' (same density in every layer, the paper's) or 'greedy' (error reduction per BOP)
    granularity  weight scales 'per_channel', 'per_tensor' or 'per_group' (with group_size)
    group_size   per_group only: inputs per scale along a row (e.g. 128; a ragged last group is shorter)
    symmetric    symmetric weight grid (False: asymmetric with zero point)
    mode         'fake' (one float conv per layer) or 'int' (integer-exact simulation)
    first_last   '8bit': first/last layers W8A8, order 1; 'same': quantized like the rest; 'fp': left float
    act_sigma    n in beta + n|gamma| for data-free activation ranges (None = act_sigma_table, or by bit-width)
    criterion    neuron selection for sparse orders: 'residual' norm or 'weight' norm
    range_propagation  data-free range of a layer input no BatchNorm/LayerNorm precedes, through the preceding
                 layer: 'moments' (default: the BN/LN moments carried through it, then n sigma), 'none'
                 (input left float) or 'interval' (sound interval arithmetic from its weights) (rex.trace)
    fold_bn      fold BatchNorm into the preceding conv before quantizing
    seed         for methods that draw random numbers (ZeroQ)
    options      method-specific settings (e.g. {'expand_ratio': 0.02} for OCS), validated into the method's
                 typed config (``spec.config``, a ``rex.methods.MethodConfig``)
    preset       named protocol (``rex.protocols.PRESETS``: shared, squant, dfq, zeroq, ocs); it fills the fields
                 below it governs that are left None (granularity, symmetric, first_last, fold_bn and:)
    first_layer, last_layer   that layer's policy (8bit | same | fp), None = first_last
    first_input, last_input   that layer's input alone: 'float' | '8bit', None = as the layer's policy says
    act_range    'bn' (BatchNorm statistics, method.md §4) | 'noise' (SQuant: sigma x std under uniform noise)
    act_sigma_table  activation bits -> sigma (None: by bit-width, ``DEFAULT_ACT_SIGMA``)
    bias_bits    None (float biases) or the bits of a symmetric per-tensor bias grid (DFQ: 16)
    relu6        'keep' | 'relu' (every ReLU6 module becomes a ReLU first, DFQ's protocol)

    A governed field given explicitly overrides the preset (and is recorded); after construction every
    governed field holds its resolved value.
    """

    method: str = "rex"
    wbits: int = 4
    abits: Optional[int] = 8
    order: int = 1
    budget: Optional[float] = None
    allocation: str = "uniform"
    granularity: Optional[str] = None  # None: the preset's (shared: per_channel)
    symmetric: Optional[bool] = None  # shared: True
    mode: str = "fake"
    first_last: Optional[str] = None  # shared: 8bit
    act_sigma: Optional[float] = None
    criterion: str = "residual"
    fold_bn: Optional[bool] = None  # shared: True
    seed: int = 0
    options: dict = field(default_factory=dict)
    group_size: Optional[int] = None
    range_propagation: str = "moments"
    preset: str = protocols.DEFAULT_PRESET
    first_layer: Optional[str] = None
    last_layer: Optional[str] = None
    first_input: Optional[str] = None
    last_input: Optional[str] = None
    act_range: Optional[str] = None  # shared: bn
    act_sigma_table: Optional[dict] = None
    bias_bits: Optional[int] = None
    relu6: Optional[str] = None  # shared: keep

    def __post_init__(self):
        self._resolve_preset()
        if not isinstance(self.method, str):
            raise ConfigError(f"method must be a method name (a string), got {self.method!r}; known: "
                              f"{', '.join(method_names())}")
        if self.method not in method_names():
            raise UnknownNameError("method", self.method, method_names())
        check_bits(self.wbits, "wbits (weight bit-width)")
        abits = None if self.abits in (None, FLOAT_BITS) else self.abits
        object.__setattr__(self, "abits", abits)
        if abits is not None:
            check_bits(abits, "abits (activation bit-width; use 32 or None for float activations)")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ConfigError(f"order K must be an integer >= 1 (1 = plain quantization), got {self.order!r}")
        if self.budget is not None:
            if (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                    or not math.isfinite(self.budget)):
                raise ConfigError(f"budget must be a finite number >= 1 (a BOPs ratio, e.g. 1.5) or None (dense "
                                  f"expansion), got {self.budget!r}")
            if self.budget < 1:
                raise ConfigError(
                    f"budget must be >= 1 (a BOPs ratio relative to the plain W{self.wbits} model, 1.5 = half an "
                    f"extra order) or an absolute BOPs count, got {self.budget}"
                )
            if self.order < 2:
                raise ConfigError(
                    f"budget={self.budget} needs order >= 2 (the budget pays for orders 2..K); set order=2 or more, or drop budget"
                )
            if self.budget <= 64 and self.budget > self.order:  # a ratio (larger numbers are absolute BOPs)
                raise ConfigError(
                    f"budget={self.budget:g} is unreachable with order={self.order}: K orders cost at most K x the "
                    f"plain BOPs; raise order to >= {math.ceil(self.budget)} or lower budget to <= {self.order} "
                    "(None = the dense expansion)"
                )
        for key, allowed in (("allocation", ALLOCATIONS), ("granularity", GRANULARITIES), ("mode", MODES),
                             ("first_last", FIRST_LAST), ("criterion", CRITERIA),
                             ("range_propagation", RANGE_PROPAGATIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key, allowed in (("first_layer", protocols.LAYER_POLICIES), ("last_layer", protocols.LAYER_POLICIES),
                             ("first_input", protocols.INPUT_POLICIES), ("last_input", protocols.INPUT_POLICIES)):
            if getattr(self, key) is not None and getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed} or None, got {getattr(self, key)!r}")
        for key, allowed in (("act_range", protocols.ACT_RANGES), ("relu6", protocols.RELU6)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        object.__setattr__(self, "act_sigma_table", protocols.check_sigma_table(self.act_sigma_table))
        if self.bias_bits is not None and (isinstance(self.bias_bits, bool) or not isinstance(self.bias_bits, int)
                                           or not 2 <= self.bias_bits <= 16):
            raise ConfigError(f"bias_bits must be an integer in 2..16 (DFQ: 16) or None (float biases), got "
                              f"{self.bias_bits!r}")
        if self.granularity == "per_group" and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                                or self.group_size < 1):
            raise ConfigError(f"granularity='per_group' needs group_size, a positive integer (inputs per scale along "
                              f"a row, e.g. 128), got {self.group_size!r}")
        if self.granularity != "per_group" and self.group_size is not None:
            raise ConfigError(f"group_size={self.group_size!r} needs granularity='per_group' (got "
                              f"{self.granularity!r}); drop group_size or set granularity='per_group'")
        if self.act_sigma is not None and (isinstance(self.act_sigma, bool) or not isinstance(self.act_sigma, (int, float))
                                           or not math.isfinite(self.act_sigma) or not self.act_sigma > 0):
            raise ConfigError(f"act_sigma must be a finite number > 0 (n in beta + n|gamma|, e.g. 6) or None (by "
                              f"bit-width), got {self.act_sigma!r}")
        for key in ("symmetric", "fold_bn"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer >= 0 (it seeds every random draw, e.g. ZeroQ's distilled "
                              f"data), got {self.seed!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a mapping, got {type(self.options).__name__}")
        # the method's typed options (rex.methods: one MethodConfig per method), validated here once
        object.__setattr__(self, "_config", method_config(self.method, self.options))

    def _resolve_preset(self) -> None:
        """Fill the governed fields left None from the preset; remember which were given (``replace``)."""
        gov = {k: getattr(self, k) for k in protocols.GOVERNED}
        object.__setattr__(self, "_explicit", frozenset(k for k, v in gov.items() if v is not None))
        resolved = protocols.resolve({**gov, "preset": self.preset})
        for k in ("preset", *protocols.GOVERNED):
            object.__setattr__(self, k, resolved[k])

    def protocol(self) -> dict[str, Any]:
        """The resolved protocol fields (``PROTOCOL_KEYS``), as recorded with a pipeline job."""
        return {k: getattr(self, k) for k in PROTOCOL_KEYS}

    @property
    def config(self):
        """``options`` as the method's typed config (defaults filled in), or None for a method registered
        without one."""
        return self._config

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """A spec from a plain mapping (a config file, JSON): unknown keys are an error, not ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantSpec needs a mapping of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != "act_sigma_effective"}  # written by to_dict()
        unknown = sorted(set(d) - names)
        if unknown:
            k = unknown[0]
            raise ConfigError(f"unknown QuantSpec key {k!r}{_did_you_mean(k, names)}; accepted keys: "
                              f"{', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_config(cls, method: dict, protocol: Optional[dict] = None) -> "QuantSpec":
        """A spec from the pipeline's config groups: ``method`` (conf/method/*.yaml: name, wbits, abits, order,
        budget, allocation, options) and ``protocol`` (conf/config.yaml: ``PROTOCOL_KEYS``, the preset and the
        fields; a null one takes the preset's value). Unknown keys in either (e.g. a ``+method.bogus=1``
        override, or a misspelt key) raise a ConfigError naming the key and the accepted ones."""
        method, protocol = dict(method or {}), dict(protocol or {})
        for group, d, known in (("method", method, METHOD_KEYS), ("protocol", protocol, PROTOCOL_KEYS)):
            unknown = sorted(set(d) - set(known))
            if unknown:
                k = unknown[0]
                raise ConfigError(f"unknown key {group}.{k}{_did_you_mean(k, known)}; accepted {group} keys: "
                                  f"{', '.join(known)}")
        if "name" not in method:
            raise ConfigError("the method config has no 'name' (conf/method/<name>.yaml must set name: <method>)")
        kw = {k: v for k, v in method.items() if k not in ("name", "display")}
        kw["method"] = method["name"]
        kw["options"] = dict(kw.get("options") or {})
        kw.update(protocol)
        return cls(**kw)

    @property
    def sigma(self) -> float:
        return self.sigma_for(self.abits)

    def sigma_for(self, abits: Optional[int]) -> float:
        """n of the activation ranges at ``abits`` bits: act_sigma, else the act_sigma_table, else by bit-width."""
        if self.act_sigma is not None:
            return self.act_sigma
        if self.act_sigma_table is not None:
            return protocols.sigma_from_table(self.act_sigma_table, abits)
        return default_act_sigma(abits)

    def replace(self, **kw) -> "QuantSpec":
        """A copy with ``kw`` changed. Governed fields the preset filled are filled again (a new preset
        fills them with its values); those given explicitly stay explicit."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in protocols.GOVERNED or f.name in self._explicit}
        d.update(kw)
        return QuantSpec(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["group_size"] is None:  # absent unless per_group, so the hashes of earlier specs are unchanged
            del d["group_size"]
        if d["range_propagation"] == "none":  # absent at its value before "moments" became the default, so the
            # hashes of earlier specs still name what they ran (a "moments" spec is new: it carries the key)
            del d["range_propagation"]
        if self.preset == protocols.DEFAULT_PRESET:  # the preset-era fields at their shared values: absent too
            shared = {"preset": protocols.DEFAULT_PRESET, **protocols.get_preset(protocols.DEFAULT_PRESET).values()}
            for k in protocols.NEW_FIELDS:
                if d[k] == shared[k]:
                    del d[k]
        d["act_sigma_effective"] = self.sigma
        return d

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def label(self) -> str:
        """Self-describing short name: method=rex,w=4,a=8,K=2,budget=1.5 (the job folder's; ``rex.labels``)"""
        return labels.label(self.method, self.wbits, self.abits, self.order, self.budget, self.allocation)


# keys of the pipeline's config groups that map onto QuantSpec fields (``QuantSpec.from_config``)
METHOD_KEYS = ("name", "display", "wbits", "abits", "order", "budget", "allocation", "options")
PROTOCOL_KEYS = ("preset", "granularity", "group_size", "symmetric", "mode", "first_last", "act_sigma", "criterion",
                 "fold_bn", "seed", "range_propagation", "first_layer", "last_layer", "first_input", "last_input",
                 "act_range", "act_sigma_table", "bias_bits", "relu6")
