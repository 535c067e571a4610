"""COCO-style detection evaluation through mmdet (dataset + pipeline + ``CocoMetric``).

``evaluate(model)`` scores a FastestDet-shaped network (FP32 or a quantized copy) on the bundled
``coco-val2017-first128`` subset: mmdet's ``CocoDataset`` (``RexCocoDataset``) with an mmcv/mmdet test pipeline
(cv2 decode = BGR, bilinear 352x352 resize without keeping the ratio), the network wrapped in the mmdet detector
``RexFastestDet`` (``DetDataPreprocessor`` /255, reference decoding and class-wise NMS), and mmdet's ``CocoMetric``
(pycocotools COCOeval, bbox, maxDets 1/10/100). Reference FP32 figures: AP 19.1, AP50 35.7, AP75 17.6 (128 images).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from rex.mm import require
from rex.mm.loop import as_mm_model, quiet_unless, run_test_loop

__all__ = ["evaluate", "REFERENCE_FP32"]

REFERENCE_FP32 = {"AP": 19.1, "AP50": 35.7, "AP75": 17.6}  # fastestdet_coco on coco-val2017-first128 (n=128)


def evaluate(model: nn.Module, data_root: Union[str, Path, None] = None, max_images: Optional[int] = None,
             progress: bool = True, threads: Optional[int] = None, input_size=None, score_thr: float = 0.001,
             iou_thr: float = 0.45, classwise: bool = False) -> dict:
    """Score ``model`` on the bundled COCO subset through mmdet.

    Args:
        model: the bare network (``N x 3 x H x W`` BGR in [0, 1] -> ``N x 85 x H/16 x W/16``), FP32 or quantized; or an
            mmdet detector (``BaseDetector``), which is then used as is with the FastestDet test pipeline.
        data_root: folder of the subset (or a folder holding ``coco-val2017-first128/``); default
            ``rex.paths.data_root()``.
        max_images: evaluate only the first N images (sorted file order); ``None`` = all 128.
        input_size: (H, W) of the network input, default (352, 352).

    Returns:
        dict with ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (percent, as CocoMetric reports them: 3
        decimals of the fraction, i.e. 0.1-point resolution), ``n`` (images), ``detections``, ``seconds`` (data +
        forward + decoding, without the metric) and ``seconds_per_image``.
    """
    require("detection")
    from mmdet.models.detectors.base import BaseDetector

    from rex.mm.det import FastestDetDetector, build_coco_metric, build_coco_subset, fastestdet_test_pipeline

    detector = as_mm_model(model, BaseDetector, lambda net: FastestDetDetector(net=net, score_thr=score_thr,
                                                                                iou_thr=iou_thr), max_images)
    with quiet_unless(progress):  # pycocotools prints
        pipeline = fastestdet_test_pipeline(tuple(input_size)) if input_size else None
        dataset = build_coco_subset(data_root, max_images=max_images, pipeline=pipeline)
        metric = build_coco_metric(dataset, classwise=classwise)
        n_dets = [0]
        _process = metric.process

        def process(data_batch, data_samples):  # count detections on the way
            for ds in data_samples:
                n_dets[0] += len(ds["pred_instances"]["scores"])
            _process(data_batch, data_samples)

        metric.process = process
        res, n, seconds = run_test_loop(detector, dataset, metric, progress=progress, desc="detection",
                                        threads=threads)
    key = {"AP": "bbox_mAP", "AP50": "bbox_mAP_50", "AP75": "bbox_mAP_75", "APs": "bbox_mAP_s",
           "APm": "bbox_mAP_m", "APl": "bbox_mAP_l"}
    out = {}
    for k, v in key.items():
        val = res.get(f"coco/{v}")
        out[k] = None if val is None else round(100.0 * float(val), 1)
    out.update(n=n, detections=n_dets[0], seconds=round(seconds, 3),
               seconds_per_image=round(seconds / max(n, 1), 4), dataset="coco-val2017-first128",
               metric="mmdet CocoMetric (bbox)")
    return out
