"""mmdet integration for FastestDet and the bundled COCO subset (importing this module registers them).

- ``RexFastestDet``: an mmdet ``BaseDetector`` wrapping any FastestDet-shaped ``nn.Module`` (FP32 or a quantized copy;
  it only calls ``net(x)``). ``predict()`` decodes the 85-channel output exactly as the reference (score
  ``obj^0.6 * cls^0.4 > 0.001``, class-wise NMS 0.45, no top-k, boxes scaled to the original image, not clipped).
- ``RexCocoDataset``: mmdet ``CocoDataset`` that also accepts ground-truth files whose category names are numeric
  strings (the bundled ``instances_val2017_first128.json`` names its categories ``"1"``, ``"2"``, ...); those are
  renamed in memory to the standard COCO names so ``metainfo['classes']`` works.
- ``RexCocoMetric``: mmdet ``CocoMetric`` with the same renaming, COCOeval's default maxDets (1, 10, 100), scoring
  only the images that were run (so ``max_images`` subsets are scored correctly).
- ``fastestdet_test_pipeline()``: mmcv/mmdet transforms reproducing the reference preprocessing (cv2 decode = BGR,
  bilinear resize to 352x352 without keeping the ratio); the model's ``DetDataPreprocessor`` divides by 255.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmdet.models.data_preprocessors import DetDataPreprocessor
from mmdet.models.detectors.base import BaseDetector
from mmdet.evaluation import CocoMetric
from mmdet.registry import DATASETS, METRICS, MODELS
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

from rex.mm.common import InferenceOnly, subset_dir, wrapped_net
from rex.models.fastestdet import COCO80_TO_91, FASTESTDET_ENTRY, build_fastestdet, decode_fastestdet

__all__ = ["FastestDetDetector", "RexCocoDataset", "fastestdet_test_pipeline", "build_coco_subset",
           "build_coco_metric", "RexCocoMetric", "coco_subset_dir", "COCO_SUBSET_NAME", "COCO_SUBSET_ANN"]

COCO_SUBSET_NAME = "coco-val2017-first128"
COCO_SUBSET_ANN = "instances_val2017_first128.json"
COCO_CLASSES = tuple(CocoDataset.METAINFO["classes"])  # standard COCO-80 names, contiguous order
_ID_TO_NAME = dict(zip(COCO80_TO_91, COCO_CLASSES))


def _name_numeric_categories(coco) -> None:
    """Categories named by their numeric id (``"1"``) get the standard COCO names (in place)."""
    for cat in coco.dataset.get("categories", []):
        name = str(cat.get("name", ""))
        if name.isdigit() and int(name) == cat["id"] and cat["id"] in _ID_TO_NAME:
            cat["name"] = _ID_TO_NAME[cat["id"]]  # coco.cats holds the same dicts


class _NamedCOCO(COCO):
    """mmdet's COCO api with :func:`_name_numeric_categories` applied."""

    def __init__(self, annotation_file=None):
        super().__init__(annotation_file)
        _name_numeric_categories(self)


@DATASETS.register_module(name="RexCocoDataset", force=True)
class RexCocoDataset(CocoDataset):
    """``CocoDataset`` tolerant of numerically named categories (see module docstring)."""

    COCOAPI = _NamedCOCO


@METRICS.register_module(name="RexCocoMetric", force=True)
class RexCocoMetric(CocoMetric):
    """mmdet ``CocoMetric`` whose GT api names numerically named categories (as ``RexCocoDataset``)."""

    def __init__(self, *args, only_processed: bool = True, **kwargs):
        kwargs.setdefault("proposal_nums", (1, 10, 100))  # COCOeval's default maxDets, as the reference
        super().__init__(*args, **kwargs)
        self.only_processed = only_processed  # score only the images that were run (``max_images`` subsets)
        if self._coco_api is not None:
            _name_numeric_categories(self._coco_api)

    def compute_metrics(self, results: list) -> dict:
        if self.only_processed and results:
            self.img_ids = sorted({gt["img_id"] for gt, _ in results})
        return super().compute_metrics(results)


@MODELS.register_module(name="RexFastestDet", force=True)
class FastestDetDetector(InferenceOnly, BaseDetector):
    """mmdet detector around a FastestDet network (inference only).

    Args:
        net: the network (``nn.Module``: BGR [0,1] ``N x 3 x H x W`` -> ``N x (5+K) x H/16 x W/16``). ``None`` builds
            the bundled COCO model (``weights_path`` overrides its checkpoint). A dict is passed to
            :func:`rex.models.fastestdet.build_fastestdet` as keyword arguments.
        score_thr, iou_thr: decoding threshold (strictly greater) and class-wise NMS IoU.
        max_per_img: optional cap on detections per image after NMS (``None`` = no cap, the reference protocol).
    """

    REGISTRY_NAME = "RexFastestDet"

    def __init__(self, net: Union[nn.Module, dict, None] = None, weights_path: Optional[str] = None,
                 score_thr: float = 0.001, iou_thr: float = 0.45, max_per_img: Optional[int] = None,
                 data_preprocessor: Union[dict, nn.Module, None] = None, init_cfg=None):
        if data_preprocessor is None:
            # BGR in, /255, no mean subtraction, no padding
            data_preprocessor = DetDataPreprocessor(mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                                                    bgr_to_rgb=False, pad_size_divisor=1)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.net = wrapped_net(net, weights_path, build_fastestdet)
        self.score_thr, self.iou_thr, self.max_per_img = score_thr, iou_thr, max_per_img

    def extract_feat(self, batch_inputs: torch.Tensor):
        return self.net(batch_inputs)

    def _forward(self, batch_inputs: torch.Tensor, batch_data_samples=None):
        return self.net(batch_inputs)

    @torch.no_grad()
    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: Sequence[DetDataSample],
                rescale: bool = True):
        out = self.net(batch_inputs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        for i, ds in enumerate(batch_data_samples):
            h, w = (ds.metainfo["ori_shape"] if rescale else ds.metainfo["img_shape"])[:2]
            boxes, scores, labels = decode_fastestdet(out[i], float(w), float(h), self.score_thr, self.iou_thr)
            if self.max_per_img is not None:
                boxes, scores, labels = boxes[:self.max_per_img], scores[:self.max_per_img], labels[:self.max_per_img]
            inst = InstanceData()
            inst.bboxes, inst.scores, inst.labels = boxes, scores, labels.long()
            ds.pred_instances = inst
        return batch_data_samples


def fastestdet_test_pipeline(input_size=FASTESTDET_ENTRY["input_size"], as_config: bool = False) -> list:
    """Test pipeline: cv2 decode (BGR), bilinear resize to ``input_size`` (H, W) ignoring the ratio, pack.

    ``as_config=True`` returns registry dicts (for mmengine configs); otherwise transform instances.
    """
    h, w = input_size
    meta = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")
    cfg = [
        dict(type="LoadImageFromFile", color_type="color", imdecode_backend="cv2"),
        dict(type="Resize", scale=(w, h), keep_ratio=False, interpolation="bilinear", backend="cv2"),
        dict(type="PackDetInputs", meta_keys=meta),
    ]
    if as_config:
        return cfg
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import PackDetInputs, Resize

    return [LoadImageFromFile(color_type="color", imdecode_backend="cv2"),
            Resize(scale=(w, h), keep_ratio=False, interpolation="bilinear", backend="cv2"),
            PackDetInputs(meta_keys=meta)]


def coco_subset_dir(data_root: Union[str, Path, None] = None) -> Path:
    """Folder holding ``images/`` and the GT json: ``data_root`` itself, or ``data_root/coco-val2017-first128``."""
    return subset_dir(data_root, COCO_SUBSET_NAME, lambda d: (d / COCO_SUBSET_ANN).is_file() and (d / "images").is_dir(),
                      "COCO", f"{COCO_SUBSET_ANN} and images/")


def build_coco_subset(data_root=None, max_images: Optional[int] = None, pipeline=None,
                      ann_file: str = COCO_SUBSET_ANN) -> RexCocoDataset:
    """The bundled COCO subset as an mmdet dataset (test mode, first ``max_images`` images in file order)."""
    root = coco_subset_dir(data_root)
    return RexCocoDataset(
        data_root=str(root), ann_file=ann_file, data_prefix=dict(img="images/"), test_mode=True,
        pipeline=fastestdet_test_pipeline() if pipeline is None else pipeline,
        indices=max_images, metainfo=dict(classes=COCO_CLASSES))


def build_coco_metric(dataset: RexCocoDataset, classwise: bool = False):
    """``RexCocoMetric`` (mmdet CocoMetric, bbox) on the dataset's GT file, COCOeval's default maxDets (1, 10, 100)."""
    metric = RexCocoMetric(ann_file=dataset.ann_file, metric="bbox", proposal_nums=(1, 10, 100), classwise=classwise)
    metric.dataset_meta = copy.deepcopy(dataset.metainfo)
    return metric
