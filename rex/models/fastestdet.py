"""FastestDet (COCO, 80 classes, 352x352): clean-room pure-PyTorch definition.

Written from ``weights/fastestdet-coco/ARCHITECTURE.md`` (upstream: GitHub dog-qiuqiu/FastestDet, commit 50473cd,
BSD-3-Clause). The network expects **BGR** input in [0, 1] (cv2 decode, bilinear resize to 352x352 without keeping
the aspect ratio, /255, no mean/std) and returns one ``N x 85 x H/16 x W/16`` tensor:
channel 0 objectness (sigmoid applied), 1..4 raw box terms, 5..84 class probabilities (softmax applied).

All convolutions are plain ``nn.Conv2d`` modules followed by ``nn.BatchNorm2d`` (so quantization can swap the convs
and fold the BNs); channel split / concat / add are functional.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from rex.errors import CheckpointError, describe_load_error
from rex.io import sha256_file
from rex.paths import weights_root

__all__ = [
    "FastestDet", "build_fastestdet", "FASTESTDET_ENTRY", "COCO80_TO_91", "decode_fastestdet",
    "load_state_dict_checked",
]

FASTESTDET_ENTRY = {
    "name": "fastestdet_coco",
    "task": "detection",
    "input_size": (352, 352),  # (H, W)
    "weights_file": "fastestdet-coco/fastestdet_coco_ap50_0.253207.pth",
    "sha256": "7f688d478ee474c82dbdb9c10e0ede2f8f3cf5d603f0825d2efd925eb561d05e",
    "default_dataset": "coco-val2017-first128",
    "num_classes": 80,
    "channel_order": "BGR",
}

# contiguous 0..79 -> COCO 91-style category ids
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def _pw(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, 1, 0, bias=False)


def _dw(c: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)


def _main_branch(c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        _pw(c, c), nn.BatchNorm2d(c), nn.ReLU(),
        _dw(c, 3, stride), nn.BatchNorm2d(c),
        _pw(c, c), nn.BatchNorm2d(c), nn.ReLU(),
    )


class ShuffleBlock(nn.Module):
    """Down block (stride 2, ``c -> 2c``, proj branch first) or basic block (even/odd channel split)."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        if down:
            c = channels
            self.branch_main = _main_branch(c, 2)
            self.branch_proj = nn.Sequential(
                _dw(c, 3, 2), nn.BatchNorm2d(c),
                _pw(c, c), nn.BatchNorm2d(c), nn.ReLU(),
            )
        else:
            self.branch_main = _main_branch(channels // 2, 1)
            self.branch_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)
        # the shuffle of the previous block is folded into an even/odd split
        a = x[:, 0::2]
        b = x[:, 1::2]
        return torch.cat((a, self.branch_main(b)), 1)


class ShuffleNetV2Backbone(nn.Module):
    def __init__(self, widths=(24, 48, 96, 192), repeats=(4, 8, 4)):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for i, n in enumerate(repeats):
            cin, cout = widths[i], widths[i + 1]
            assert cout == 2 * cin
            blocks = [ShuffleBlock(cin, down=True)] + [ShuffleBlock(cout, down=False) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stage2, self.stage3, self.stage4 = stages

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.first_conv(x))
        p1 = self.stage2(x)
        p2 = self.stage3(p1)
        p3 = self.stage4(p2)
        return p1, p2, p3


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_pw(cin, cout), nn.BatchNorm2d(cout), nn.ReLU())


class _Conv1x1(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1x1 = _cbr(cin, cout)

    def forward(self, x):
        return self.conv1x1(x)


def _dw5_triples(c: int, n: int) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers += [_dw(c, 5), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers)


class SPP(nn.Module):
    def __init__(self, cin: int = 336, c: int = 96):
        super().__init__()
        self.Conv1x1 = _Conv1x1(cin, c)
        self.S1 = _dw5_triples(c, 1)
        self.S2 = _dw5_triples(c, 2)
        self.S3 = _dw5_triples(c, 3)
        self.output = nn.Sequential(_pw(3 * c, c), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.Conv1x1(x)
        z = torch.cat((self.S1(x), self.S2(x), self.S3(x)), 1)
        return self.relu(x + self.output(z))


class _Head(nn.Module):
    def __init__(self, c: int, cout: int):
        super().__init__()
        self.conv5x5 = nn.Sequential(_dw(c, 5), nn.BatchNorm2d(c), nn.ReLU(),
                                     _pw(c, cout), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.conv5x5(x)


class DetectHead(nn.Module):
    def __init__(self, c: int = 96, num_classes: int = 80):
        super().__init__()
        self.conv1x1 = _Conv1x1(c, c)
        self.obj_layers = _Head(c, 1)
        self.reg_layers = _Head(c, 4)
        self.cls_layers = _Head(c, num_classes)

    def forward(self, x):
        h = self.conv1x1(x)
        obj = torch.sigmoid(self.obj_layers(h))
        reg = self.reg_layers(h)
        cls = F.softmax(self.cls_layers(h), dim=1)
        return torch.cat((obj, reg, cls), 1)


class FastestDet(nn.Module):
    """FastestDet detector: BGR [0,1] ``N x 3 x H x W`` (H, W multiples of 32) -> ``N x 85 x H/16 x W/16``."""

    def __init__(self, num_classes: int = 80):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ShuffleNetV2Backbone()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.avg_pool = nn.AvgPool2d(3, 2, 1)
        self.SPP = SPP(48 + 96 + 192, 96)
        self.detect_head = DetectHead(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1, p2, p3 = self.backbone(x)
        p = torch.cat((self.avg_pool(p1), p2, self.upsample(p3)), 1)
        return self.detect_head(self.SPP(p))


@torch.no_grad()
def decode_fastestdet(out: torch.Tensor, img_w: float, img_h: float, score_thr: float = 0.001,
                      iou_thr: float = 0.45):
    """Post-processing of ARCHITECTURE.md section 3 for one image.

    ``out``: ``85 x Hg x Wg`` (one image of the model output). Returns ``(boxes_xyxy [K,4] in original-image pixels,
    scores [K], labels [K] contiguous 0..79)``, sorted by descending score, after class-wise NMS (no top-k cap).
    """
    from torchvision.ops import batched_nms

    out = out.detach().float()
    if out.dim() == 4:
        if out.shape[0] != 1:
            raise ValueError("decode_fastestdet expects one image (85 x Hg x Wg)")
        out = out[0]
    _, hg, wg = out.shape
    p = out.permute(1, 2, 0).reshape(hg * wg, -1)
    obj = p[:, 0]
    cls_p, cls_k = p[:, 5:].max(1)
    score = obj.pow(0.6) * cls_p.pow(0.4)
    gy, gx = torch.meshgrid(torch.arange(hg, dtype=p.dtype), torch.arange(wg, dtype=p.dtype), indexing="ij")
    cx = (torch.tanh(p[:, 1]) + gx.reshape(-1)) / wg
    cy = (torch.tanh(p[:, 2]) + gy.reshape(-1)) / hg
    w = torch.sigmoid(p[:, 3])
    h = torch.sigmoid(p[:, 4])
    boxes = torch.stack(((cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w, (cy + h / 2) * img_h), 1)
    keep = score > score_thr
    boxes, score, cls_k = boxes[keep], score[keep], cls_k[keep]
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), score, cls_k
    keep = batched_nms(boxes, score, cls_k, iou_thr)  # sorted by decreasing score
    return boxes[keep], score[keep], cls_k[keep]


def load_state_dict_checked(model: nn.Module, path: Union[str, Path], expected_sha256: Optional[str] = None,
                            what: str = "model") -> nn.Module:
    """``torch.load(weights_only=True)`` + strict ``load_state_dict``; every failure -> CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what}: checkpoint {path} not found. Point REX_WEIGHTS_ROOT at the folder holding the bundled "
            f"weights (default ../shared/weights next to the project) or pass weights_path=.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file / pickled objects
        sha = ""
        if expected_sha256:
            try:
                sha = f" (sha256 {sha256_file(path)[:16]}..., expected {expected_sha256[:16]}...)"
            except OSError:
                pass
        raise CheckpointError(
            f"{what}: cannot read checkpoint {path}{sha}: {describe_load_error(e)}. The file is corrupted, truncated "
            f"or not a plain state dict; restore it from the shared weights folder.") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(sd).__name__}, expected a state dict (OrderedDict of "
                              f"tensors); re-export it with torch.save(model.state_dict(), path).")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = str(e)
        raise CheckpointError(
            f"{what}: {path} does not match the architecture (strict load failed): {msg[:1500]}. "
            f"Use the checkpoint this definition was written for.") from e
    return model


def build_fastestdet(weights_path: Union[str, Path, None] = None, pretrained: bool = True) -> FastestDet:
    """FastestDet in eval mode, with the bundled COCO weights (or ``weights_path``) loaded strictly."""
    model = FastestDet(80)
    if pretrained or weights_path is not None:
        path = Path(weights_path) if weights_path is not None else weights_root() / FASTESTDET_ENTRY["weights_file"]
        load_state_dict_checked(model, path, FASTESTDET_ENTRY["sha256"], "FastestDet")
    return model.eval()
