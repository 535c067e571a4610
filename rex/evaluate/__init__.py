"""Evaluators, one module per task (imported on demand so that classification needs no mm* packages).

- `rex.evaluate.classification.evaluate(model, dataset, ...)` -> top1, top5, agreement, kl, n, seconds
- `rex.evaluate.detection` / `rex.evaluate.segmentation` (mmdet / mmseg based)
"""
