"""mmengine configs for the bundled models, runnable with mmengine's ``Runner`` (``Runner.from_cfg(cfg).test()``).

They use the registered rex classes (``RexFastestDet`` + ``RexCocoDataset`` + ``RexCocoMetric`` in scope mmdet;
``RexESPNetSegmentor`` + ``RexCamVidDataset`` + mmseg ``IoUMetric`` in scope mmseg); ``custom_imports`` makes the
Runner import the registering modules.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional, Union

__all__ = ["fastestdet_coco_config", "espnet_camvid_config"]


def _common(scope: str, work_dir: str, module: str) -> dict:
    return dict(
        default_scope=scope,
        # mmengine keys its DefaultScope instance by experiment name, which defaults to a timestamp in seconds:
        # two Runners built within the same second (a det then a seg config) would share the first one's scope.
        experiment_name=f"rex_{scope}_{uuid.uuid4().hex[:8]}",  # mmengine appends the timestamp
        custom_imports=dict(imports=[module], allow_failed_imports=False),
        work_dir=work_dir,
        test_cfg=dict(type="TestLoop"),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=50)),
        log_level="WARNING",
        launcher="none",
    )


def _loader(dataset: dict) -> dict:
    return dict(batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
                sampler=dict(type="DefaultSampler", shuffle=False), dataset=dataset)


def fastestdet_coco_config(data_root: Union[str, Path, None] = None, max_images: Optional[int] = None,
                           work_dir: str = "./work_dirs/fastestdet_coco", weights_path: Optional[str] = None):
    """Config: FastestDet (bundled weights) on the bundled COCO subset, scored by CocoMetric."""
    from mmengine.config import Config

    from rex.mm.det import COCO_CLASSES, COCO_SUBSET_ANN, coco_subset_dir, fastestdet_test_pipeline

    root = coco_subset_dir(data_root)
    cfg = _common("mmdet", work_dir, "rex.mm.det")
    cfg.update(
        model=dict(type="RexFastestDet", weights_path=None if weights_path is None else str(weights_path)),
        test_dataloader=_loader(dict(
            type="RexCocoDataset", data_root=str(root), ann_file=COCO_SUBSET_ANN, data_prefix=dict(img="images/"),
            test_mode=True, indices=max_images, metainfo=dict(classes=COCO_CLASSES),
            pipeline=fastestdet_test_pipeline(as_config=True))),
        test_evaluator=dict(type="RexCocoMetric", ann_file=str(root / COCO_SUBSET_ANN), metric="bbox"),
    )
    return Config(cfg)


def espnet_camvid_config(data_root: Union[str, Path, None] = None, max_images: Optional[int] = None,
                         work_dir: str = "./work_dirs/espnet_camvid", weights_path: Optional[str] = None,
                         void_mode: str = "reference"):
    """Config: ESPNet CamVid (bundled weights) on the bundled CamVid subset, scored by mmseg's IoUMetric."""
    from mmengine.config import Config

    from rex.mm.seg import camvid_subset_dir, espnet_test_pipeline

    root = camvid_subset_dir(data_root)
    cfg = _common("mmseg", work_dir, "rex.mm.seg")
    cfg.update(
        model=dict(type="RexESPNetSegmentor", variant="camvid",
                   weights_path=None if weights_path is None else str(weights_path)),
        test_dataloader=_loader(dict(
            type="RexCamVidDataset", data_root=str(root), test_mode=True, indices=max_images, void_mode=void_mode,
            pipeline=espnet_test_pipeline(as_config=True))),
        test_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"], ignore_index=255),
    )
    return Config(cfg)
