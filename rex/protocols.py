"""Named protocols (presets): the settings under which each baseline paper published its numbers, beside the
project's shared protocol, so that a published number can be reproduced and the difference between protocols
is visible in every table (a ``preset`` column and the caption).

One registry, ``PRESETS``: name -> ``Protocol`` (the values of the protocol fields it governs, and a one-line
description). ``QuantSpec(preset=...)`` / ``protocol.preset`` in conf/config.yaml / ``--preset`` on the CLI.

Explicit keys win: a governed field the user sets (not None) overrides the preset's value, and the spec records
it (its hash and the job's ``p=`` variant change with it); a field left None takes the preset's value. So
``QuantSpec(method="squant", preset="squant", symmetric=True)`` is SQuant's protocol with a symmetric grid, an
ablation of one protocol difference. In a grid file a protocol key at the shared preset's value counts as "not
set" (grid files list every key), see ``rex.pipeline.grid``.

Pure Python (no torch): the Snakefile's grid expansion resolves presets to hash the job folders.

What each native preset does and what the engine cannot express (differences recorded here, on purpose):

- ``squant`` (SQuant README and main.py, github.com/clevercool/SQuant): per-channel asymmetric min/max weights at
  the run's bit-width in every layer, first and last included; BatchNorm not folded (their quantizer skips
  modules named *norm*); activation range per tensor = sigma x std of the layer input under one batch of uniform
  noise (torch.rand, 256 images), std of the positive entries for a non-negative input, sigma / 1.25 and a
  symmetric range for a signed one, clipped at the batch maximum below 6 bits; sigma 12 / 14 / 25 at 4 / 6 / 8
  bits (run.sh); first layer input float, last layer input 8-bit. Differs: SQuant measures each input in the
  quantized model (its earlier layers already quantized), this engine in the float model; its weight grid is
  min/max without forcing 0 into the range (a conv channel always spans 0: the same grid), its signed
  activation grid has 2^b - 1 steps where this engine's symmetric one has 2^b - 2; sigma at other bit-widths
  (not published) is that of the nearest lower published one.
- ``dfq`` (Nagel et al. 2019, and the re-implementation github.com/jakc4103/DFQ whose MobileNetV2 table
  method.md §7 cites: "Int8**: 8 bits weight, 8 bits activation, 16 bits bias", asymmetric unless marked
  symmetric): per-tensor asymmetric weights, every ReLU6 replaced by ReLU (the whole model, not only the
  equalization paths), biases on a 16-bit grid (symmetric per tensor here); BN-derived ranges and the first/last
  policy of the shared protocol (at W8A8, the paper's setting, every layer is 8-bit either way).
- ``zeroq`` (Cai et al. 2020, github.com/amirgholami/ZeroQ): per-channel asymmetric weights in every layer, first
  layer input float, BatchNorm kept; the activation ranges come from distilled data when the method is
  ``zeroq`` / ``zeroq_lite`` (the method sets them; other methods keep BN-derived ranges). Differs: ZeroQ
  quantizes activations after each ReLU, this engine at layer inputs (a linear bottleneck's output is quantized
  here, float there).
- ``ocs`` (Zhao et al. 2019): per-tensor symmetric weights, first layer left float (weights and input), the
  last quantized like the body.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

DEFAULT_PRESET = "shared"
ACT_RANGES = ("bn", "noise")  # BN-derived (beta + n|gamma| propagated) | sigma x std under uniform noise
LAYER_POLICIES = ("8bit", "same", "fp")  # the first/last-layer policy values (QuantSpec.first_last)
INPUT_POLICIES = ("float", "8bit")  # a first/last layer's input alone: left float | 8 bits
RELU6 = ("keep", "relu")


@dataclass(frozen=True)
class Protocol:
    """The protocol fields a preset governs (``QuantSpec`` fields of the same names).

    granularity, symmetric, first_last, fold_bn  as in QuantSpec
    first_layer, last_layer  the first / last layer's policy (8bit | same | fp); None = ``first_last``
    first_input, last_input  that layer's input alone: 'float' or '8bit'; None = as the layer's policy says
    act_range        'bn' (BatchNorm statistics, method.md §4) or 'noise' (SQuant: sigma x std of each layer
                     input under a batch of uniform noise images)
    act_sigma_table  activation bits -> sigma (None = rex.spec.DEFAULT_ACT_SIGMA by bit-width)
    bias_bits        None (float biases) or the bits (2..16) of a symmetric per-tensor bias grid (DFQ: 16)
    relu6            'keep' or 'relu' (every ReLU6 module becomes a ReLU before quantization)
    """

    description: str
    granularity: str = "per_channel"
    symmetric: bool = True
    first_last: str = "8bit"
    first_layer: Optional[str] = None
    last_layer: Optional[str] = None
    first_input: Optional[str] = None
    last_input: Optional[str] = None
    act_range: str = "bn"
    act_sigma_table: Optional[dict] = None
    fold_bn: bool = True
    bias_bits: Optional[int] = None
    relu6: str = "keep"

    def values(self) -> dict[str, Any]:
        """field -> value of every governed field (a fresh dict: the table is never mutated)."""
        return {f: _copy(getattr(self, f)) for f in GOVERNED}


def _copy(v):
    return dict(v) if isinstance(v, dict) else v


GOVERNED = tuple(f.name for f in dataclasses.fields(Protocol) if f.name != "description")
# the fields added with the presets: absent from a spec's dict (and hash) while at the shared value, so that the
# hashes of every spec written before them are unchanged
NEW_FIELDS = ("preset", "first_layer", "last_layer", "first_input", "last_input", "act_range", "act_sigma_table",
              "bias_bits", "relu6")

SQUANT_SIGMA = {4: 12.0, 6: 14.0, 8: 25.0}  # SQuant's run.sh: -s 12 / 14 / 25 at W4A4 / W6A6 / W8A8

PRESETS: dict[str, Protocol] = {
    "shared": Protocol("the project's protocol: symmetric per-channel weights, BN-derived activation ranges "
                       "(sigma by bit-width), first/last layers W8A8, BN folded"),
    "squant": Protocol("SQuant's: asymmetric per-channel weights in every layer, activation range sigma x std under "
                       "uniform noise (sigma 12/14/25 at 4/6/8 bits), first input float, last input 8-bit, BN kept",
                       granularity="per_channel", symmetric=False, first_last="same", first_input="float",
                       last_input="8bit", act_range="noise", act_sigma_table=SQUANT_SIGMA, fold_bn=False),
    "dfq": Protocol("DFQ's: asymmetric per-tensor weights, ReLU6 -> ReLU everywhere, 16-bit biases, BN-derived "
                    "ranges", granularity="per_tensor", symmetric=False, bias_bits=16, relu6="relu"),
    "zeroq": Protocol("ZeroQ's: asymmetric per-channel weights in every layer, first input float, BN kept, ranges "
                      "from distilled data (methods zeroq / zeroq_lite)", granularity="per_channel", symmetric=False,
                      first_last="same", first_input="float", fold_bn=False),
    "ocs": Protocol("OCS's: symmetric per-tensor weights, first layer float, the last quantized like the body",
                    granularity="per_tensor", symmetric=True, first_last="same", first_layer="fp"),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name) -> Protocol:
    """The preset ``name``, or a one-line ConfigError listing the known ones."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown protocol preset {name!r}; known presets: {', '.join(PRESETS)} "
                          "(set protocol.preset / QuantSpec(preset=...) / --preset to one of them)")
    return PRESETS[name]


def resolve(values: dict) -> dict:
    """``values`` (protocol keys, None = unset) with every governed key left None filled from its preset
    (``values['preset']``, default shared); a new dict with ``preset`` set. Keys that are not governed are kept
    as they are."""
    out = dict(values)
    name = out.get("preset")
    name = DEFAULT_PRESET if name is None else name
    preset = get_preset(name)
    out["preset"] = name
    for k, v in preset.values().items():
        if out.get(k) is None:
            out[k] = v
    return out


def sigma_from_table(table: dict, abits: Optional[int]) -> float:
    """Sigma of ``abits`` from a bits -> sigma table: the entry of ``abits``, else of the nearest lower
    bit-width in the table, else the smallest one (float activations read as 8 bits and more)."""
    bits = 32 if abits is None else abits
    keys = sorted(table)
    lower = [k for k in keys if k <= bits]
    return float(table[lower[-1] if lower else keys[0]])


def check_sigma_table(table) -> Optional[dict]:
    """``table`` as {int bits: float sigma > 0}, or a ConfigError naming the problem."""
    if table is None:
        return None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"act_sigma_table must be a non-empty mapping of activation bits to sigma, e.g. "
                          f"{{4: 12, 6: 14, 8: 25}}, or null (by bit-width), got {table!r}")
    out = {}
    for k, v in table.items():
        try:
            bits = int(k)
        except (TypeError, ValueError):
            bits = None
        if bits is None or isinstance(k, bool) or not 2 <= bits <= 32:
            raise ConfigError(f"act_sigma_table keys must be activation bit-widths (2..32), got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise ConfigError(f"act_sigma_table[{k}] must be a finite number > 0 (a sigma), got {v!r}")
        out[bits] = float(v)
    return dict(sorted(out.items()))
