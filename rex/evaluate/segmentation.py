"""CamVid segmentation evaluation through mmseg (dataset + pipeline + ``IoUMetric``).

``evaluate(model)`` scores an ESPNet-shaped network (FP32 or a quantized copy) on the bundled ``camvid-test-sub4``
subset (59 images): mmseg ``BaseSegDataset`` (``RexCamVidDataset``, 11 classes) with an mmcv/mmseg test pipeline
(cv2 decode = BGR, native 480x360), the network wrapped in the mmseg segmentor ``RexESPNetSegmentor``
(``(img - mean) / std / 255`` in float64, argmax over all 12 outputs) and mmseg's ``IoUMetric``.
With ``void_mode="reference"`` (default) the score follows ARCHITECTURE.md section 3 (void pixels predicted as a class
count as false positives; FP32 mIoU 55.59, aAcc 86.35); ``void_mode="ignore"`` masks void pixels out (57.29).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from rex.mm import require
from rex.mm.loop import as_mm_model, quiet_unless, run_test_loop

__all__ = ["evaluate", "REFERENCE_FP32"]

REFERENCE_FP32 = {"mIoU": 55.59, "aAcc": 86.35}  # espnet_camvid on camvid-test-sub4 (n=59)


def evaluate(model: nn.Module, data_root: Union[str, Path, None] = None, max_images: Optional[int] = None,
             progress: bool = True, threads: Optional[int] = None, void_mode: str = "reference",
             per_class: bool = False) -> dict:
    """Score ``model`` on the bundled CamVid subset through mmseg.

    Args:
        model: the bare network (BGR normalised ``N x 3 x H x W`` -> ``N x 12 x H x W`` logits), FP32 or quantized; or
            an mmseg segmentor (``BaseSegmentor``), then used as is with the CamVid test pipeline.
        data_root: folder of the subset (or a folder holding ``camvid-test-sub4/``); default ``rex.paths.data_root()``.
        max_images: evaluate only the first N images (sorted); ``None`` = all 59.
        void_mode: ``"reference"`` (ARCHITECTURE.md protocol) or ``"ignore"`` (void masked out).
        per_class: also return ``IoU_per_class`` (percent, from mmseg's table).

    Returns:
        dict with ``mIoU``, ``aAcc``, ``mAcc`` (percent, 2 decimals as IoUMetric reports), ``n``, ``seconds`` (data +
        forward + argmax, without the metric) and ``seconds_per_image``.
    """
    require("segmentation")
    from mmseg.models.segmentors.base import BaseSegmentor

    from rex.mm.seg import ESPNetSegmentor, build_camvid_subset, build_iou_metric

    segmentor = as_mm_model(model, BaseSegmentor, lambda net: ESPNetSegmentor(net=net, variant="camvid"), max_images)
    dataset = build_camvid_subset(data_root, max_images=max_images, void_mode=void_mode)
    metric = build_iou_metric(dataset)
    per_class_iou = {}
    if per_class:
        _compute = metric.compute_metrics

        def compute(results):  # recompute the per-class IoU from the same accumulated areas
            tot = [sum(r[i] for r in results) for i in range(4)]
            iou = (tot[0] / tot[1]).numpy() * 100.0
            per_class_iou.update({c: round(float(v), 2) for c, v in zip(dataset.metainfo["classes"], iou)})
            return _compute(results)

        metric.compute_metrics = compute
    with quiet_unless(progress):
        res, n, seconds = run_test_loop(segmentor, dataset, metric, progress=progress, desc="segmentation",
                                        threads=threads)
    out = {"mIoU": round(float(res["mIoU"]), 2), "aAcc": round(float(res["aAcc"]), 2),
           "mAcc": round(float(res.get("mAcc", float("nan"))), 2),
           "n": n, "seconds": round(seconds, 3), "seconds_per_image": round(seconds / max(n, 1), 4),
           "dataset": "camvid-test-sub4", "metric": f"mmseg IoUMetric (void_mode={void_mode})"}
    if per_class:
        out["IoU_per_class"] = per_class_iou
    return out
