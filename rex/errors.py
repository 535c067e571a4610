"""Errors that name the problem and the fix. Every user-facing failure raises one of these."""
from __future__ import annotations

import re
from typing import Iterable


class RexError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with status 2."""


class ConfigError(RexError, ValueError):
    """A configuration value is out of range, malformed or contradicts another one."""


class NotApplicableError(ConfigError):
    """The method does not apply to this model (DFQ's bias correction or ZeroQ's distillation on a model without
    BatchNorm): a result of its own, shown as "n/a (<reason>)" in the tables, not a failure. ``reason`` is the
    short text the tables show (e.g. "no BatchNorm")."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class UnknownNameError(RexError, KeyError):
    """A registry lookup failed; the message lists the known names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class DatasetError(RexError):
    """A dataset folder is missing, empty or unreadable."""


class CheckpointError(RexError):
    """A checkpoint is missing, corrupted, truncated or does not match the architecture."""


class WeightError(RexError, ValueError):
    """A weight tensor cannot be quantized (NaN or Inf values)."""


class AccumulatorOverflowError(RexError, OverflowError):
    """An integer accumulation is too wide to be simulated exactly (beyond 2^53)."""


class RexWarning(UserWarning):
    """Base class of the library's warnings (shown once per call site by Python's warnings machinery)."""


class Int32OverflowWarning(RexWarning):
    """mode='int': an int32 accumulator could overflow for some layers' bit-widths and fan-in."""


def describe_load_error(exc: BaseException) -> str:
    """A one-line reason for a failed ``torch.load(weights_only=True)``, without torch's advice to retry with
    ``weights_only=False`` (which would execute whatever the file's pickle asks for)."""
    text = str(exc)
    if "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        glob = next((ln for ln in lines if "GLOBAL" in ln), None)
        if glob is not None:
            # only the name of the refused global: torch's allowlisting advice (add_safe_globals) is not relayed
            m = re.search(r"GLOBAL\s+([\w.]+)", glob)
            glob = f"GLOBAL {m.group(1)}" if m else "a Python global"
            return (f"it holds pickled Python objects ({glob}), which weights_only loading refuses "
                    "to unpickle because unpickling them could run arbitrary code; only a plain state_dict "
                    "(torch.save(model.state_dict(), path)) is accepted, from a source you trust")
        detail = next((ln for ln in lines if ln.lower().startswith(("unsupported", "weightsunpickler error"))
                       and not ln.endswith(":")), "")
        return f"not a PyTorch tensor file ({detail or 'unreadable pickle stream'})"
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}"
