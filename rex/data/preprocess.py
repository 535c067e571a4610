"""Input preprocessing description shared by model entries and datasets.

`Preprocess` follows torchvision's `ImageClassification` preset: PIL image -> Resize(resize) (shorter
side when an int) -> CenterCrop(crop) -> uint8 tensor -> float / 255 -> Normalize(mean, std).
The geometric part (everything up to the uint8 tensor) is what the dataset cache stores; mean/std are
applied on the fly, so one cache file serves every model with the same geometry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Tuple, Union

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")

Size = Union[int, Tuple[int, int]]


def _as_size(value: Any) -> Optional[Size]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return int(value[0])
        if len(value) == 2:
            return (int(value[0]), int(value[1]))
        raise ConfigError(f"size must be an int or (height, width), got {value!r}")
    return int(value)


def _hw(value: Size) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image file into the model's input tensor.

    resize: shorter side (int) or exact (height, width); None = no resize.
    crop: center crop size (int or (h, w)); None = no crop.
    interpolation: torchvision InterpolationMode value ("bilinear", "bicubic", ...).
    mean/std: per-channel normalisation applied after scaling to [0, 1].
    input_size: (height, width) of the tensor the model sees.
    channels: 3 (RGB; grayscale images are converted) or 1 (grayscale).
    """

    resize: Optional[Size] = 256
    crop: Optional[Size] = 224
    interpolation: str = "bilinear"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    input_size: Tuple[int, int] = field(default=None)  # type: ignore[assignment]
    channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _as_size(self.resize))
        object.__setattr__(self, "crop", _as_size(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        interp = str(getattr(self.interpolation, "value", self.interpolation)).lower()
        if interp not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
        object.__setattr__(self, "interpolation", interp)
        if self.input_size is None:
            if self.crop is not None:
                size = _hw(self.crop)
            elif isinstance(self.resize, tuple):
                size = self.resize
            else:
                raise ConfigError("Preprocess needs input_size when there is no crop and no (h, w) resize")
        else:
            size = _hw(_as_size(self.input_size))  # type: ignore[arg-type]
        object.__setattr__(self, "input_size", tuple(int(v) for v in size))
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"mean/std need {self.channels} values, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.channels, *self.input_size)

    def geometry_key(self) -> dict:
        """The fields that change the cached uint8 pixels (not mean/std)."""
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation,
                "input_size": list(self.input_size), "channels": self.channels}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def imagenet(cls, resize: Size = 256, crop: Size = 224, interpolation: str = "bilinear") -> "Preprocess":
        return cls(resize=resize, crop=crop, interpolation=interpolation)

    @classmethod
    def from_torchvision(cls, weights: Any) -> "Preprocess":
        """Read resize / crop / interpolation / mean / std from a torchvision Weights enum member."""
        t = weights.transforms()
        crop = _as_size(list(getattr(t, "crop_size", [224])))
        resize = _as_size(list(getattr(t, "resize_size", [256])))
        return cls(resize=resize, crop=crop, interpolation=str(t.interpolation.value),
                   mean=tuple(t.mean), std=tuple(t.std), channels=3)


def as_preprocess(value: Any) -> Optional[Preprocess]:
    """Accept a Preprocess, a model entry / bundle carrying one, a dict, or None."""
    if value is None or isinstance(value, Preprocess):
        return value
    if isinstance(value, dict):
        return Preprocess(**value)
    inner = getattr(value, "preprocess", None)
    if isinstance(inner, Preprocess):
        return inner
    entry = getattr(value, "entry", None)
    if entry is not None and isinstance(getattr(entry, "preprocess", None), Preprocess):
        return entry.preprocess
    raise ConfigError(f"cannot use {type(value).__name__} as preprocessing; pass a rex.data.Preprocess "
                      "or a model entry")
