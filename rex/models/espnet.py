"""ESPNet (p=2, q=8) for CamVid (12 outputs) and Cityscapes (20 outputs): clean-room pure-PyTorch definition.

Written from ``weights/espnet-camvid/ARCHITECTURE.md`` (upstream: GitHub sacmehta/ESPNet, commit afe71c3, MIT).
Input: **BGR** float, normalised as ``(img_bgr - mean) / std / 255`` (note the extra /255), H and W multiples of 8.
Output: logits ``N x C x H x W`` (no softmax). Convolutions are plain ``nn.Conv2d`` / ``nn.ConvTranspose2d``, BN is
``nn.BatchNorm2d(eps=1e-3)``, activations ``nn.PReLU(C)``; concat / add are functional.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from rex.models.fastestdet import load_state_dict_checked
from rex.paths import weights_root

__all__ = [
    "ESPNet", "build_espnet_camvid", "build_espnet_cityscapes", "ESPNET_CAMVID_ENTRY", "ESPNET_CITYSCAPES_ENTRY",
    "CAMVID_CLASSES", "CAMVID_MEAN_BGR", "CAMVID_STD_BGR", "camvid_preprocess",
]

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_MEAN_BGR = (110.331, 108.409, 105.033)
CAMVID_STD_BGR = (72.126, 72.691, 69.904)
CITYSCAPES_MEAN_BGR = (72.3923111, 82.90893555, 73.15840149)
CITYSCAPES_STD_BGR = (45.3192215, 46.15289307, 44.91483307)

ESPNET_CAMVID_ENTRY = {
    "name": "espnet_camvid",
    "task": "segmentation",
    "input_size": (360, 480),  # (H, W), native CamVid size, no resize
    "weights_file": "espnet-camvid/espnet_p_2_q_8_camvid.pth",
    "sha256": "7d354a257170322086dcd4c1e89a482454cf2c9d30b085e70883878dd59301af",
    "default_dataset": "camvid-test-sub4",
    "num_classes": 11,  # + 1 void output channel
    "channel_order": "BGR",
}

ESPNET_CITYSCAPES_ENTRY = {
    "name": "espnet_cityscapes",
    "task": "segmentation",
    "input_size": (512, 1024),
    "weights_file": "espnet-cityscapes/espnet_p_2_q_8.pth",
    "sha256": "343b0e77e8545d36113c4f3efbf1ee349256f25c97c9f9d5ddefe45f2f49763e",
    "default_dataset": None,  # no redistributable Cityscapes data
    "num_classes": 19,  # + 1 ignore/background output channel
    "channel_order": "BGR",
}

_EPS = 1e-3


class CBR(nn.Module):
    def __init__(self, cin, cout, k, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, (k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_EPS)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class BR(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, eps=_EPS)
        self.act = nn.PReLU(c)

    def forward(self, x):
        return self.act(self.bn(x))


class C(nn.Module):
    def __init__(self, cin, cout, k, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, (k - 1) // 2, bias=False)

    def forward(self, x):
        return self.conv(x)


class CD(nn.Module):
    def __init__(self, cin, cout, d):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, d, dilation=d, bias=False)

    def forward(self, x):
        return self.conv(x)


class _ESPBase(nn.Module):
    def __init__(self, cin, cout, down: bool):
        super().__init__()
        n = cout // 5
        n1 = cout - 4 * n
        self.c1 = C(cin, n, 3, 2) if down else C(cin, n, 1, 1)
        self.d1 = CD(n, n1, 1)
        self.d2 = CD(n, n, 2)
        self.d4 = CD(n, n, 4)
        self.d8 = CD(n, n, 8)
        self.d16 = CD(n, n, 16)

    def _hff(self, x):
        r = self.c1(x)
        e1, e2, e4, e8, e16 = self.d1(r), self.d2(r), self.d4(r), self.d8(r), self.d16(r)
        s1 = e2
        s2 = s1 + e4
        s3 = s2 + e8
        s4 = s3 + e16
        return torch.cat((e1, s1, s2, s3, s4), 1)


class DownSamplerB(_ESPBase):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, down=True)
        self.bn = nn.BatchNorm2d(cout, eps=_EPS)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.bn(self._hff(x)))


class DilatedParllelResidualBlockB(_ESPBase):
    def __init__(self, cin, cout, add: bool = True):
        super().__init__(cin, cout, down=False)
        if add and cin != cout:
            raise ValueError("residual ESP block with add=True needs in == out")
        self.add = add
        self.bn = BR(cout)

    def forward(self, x):
        m = self._hff(x)
        if self.add:
            m = m + x
        return self.bn(m)


class _Pyramid(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.pools = nn.ModuleList([nn.AvgPool2d(3, 2, 1) for _ in range(n)])

    def forward(self, x):
        for p in self.pools:
            x = p(x)
        return x


class ESPNetEncoder(nn.Module):
    def __init__(self, num_out: int, p: int = 2, q: int = 8):
        super().__init__()
        self.level1 = CBR(3, 16, 3, 2)
        self.sample1 = _Pyramid(1)
        self.sample2 = _Pyramid(2)
        self.b1 = BR(16 + 3)
        self.level2_0 = DownSamplerB(16 + 3, 64)
        self.level2 = nn.ModuleList([DilatedParllelResidualBlockB(64, 64) for _ in range(p)])
        self.b2 = BR(128 + 3)
        self.level3_0 = DownSamplerB(128 + 3, 128)
        self.level3 = nn.ModuleList([DilatedParllelResidualBlockB(128, 128) for _ in range(q)])
        self.b3 = BR(256)
        self.classifier = C(256, num_out, 1, 1)


class ESPNet(nn.Module):
    """ESPNet p=2, q=8 segmentation network. ``skip="o0c"`` (CamVid checkpoint) or ``"o0"`` (Cityscapes)."""

    def __init__(self, num_out: int = 12, skip: str = "o0c", p: int = 2, q: int = 8):
        super().__init__()
        if skip not in ("o0c", "o0"):
            raise ValueError("skip must be 'o0c' (CamVid) or 'o0' (Cityscapes)")
        self.num_out, self.skip = num_out, skip
        c = num_out
        self.encoder = ESPNetEncoder(c, p, q)
        self.level3_C = C(128 + 3, c, 1, 1)
        self.br = nn.BatchNorm2d(c, eps=_EPS)
        self.conv = CBR(c + (19 if skip == "o0c" else 16), c, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, padding=0, output_padding=0, bias=False))
        self.combine_l2_l3 = nn.Sequential(BR(2 * c), DilatedParllelResidualBlockB(2 * c, c, add=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, padding=0, output_padding=0, bias=False),
                                   BR(c))
        self.classifier = nn.ConvTranspose2d(c, c, 2, stride=2, padding=0, output_padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        o0 = e.level1(x)
        i1 = e.sample1(x)
        i2 = e.sample2(x)
        o0c = e.b1(torch.cat((o0, i1), 1))
        o10 = e.level2_0(o0c)
        o1 = o10
        for blk in e.level2:
            o1 = blk(o1)
        o1c = e.b2(torch.cat((o1, o10, i2), 1))
        o20 = e.level3_0(o1c)
        o2 = o20
        for blk in e.level3:
            o2 = blk(o2)
        o2c = e.b3(torch.cat((o20, o2), 1))
        a = self.up_l3(self.br(e.classifier(o2c)))
        b = self.level3_C(o1c)
        u = self.up_l2(self.combine_l2_l3(torch.cat((b, a), 1)))
        skip = o0c if self.skip == "o0c" else o0
        f = self.conv(torch.cat((u, skip), 1))
        return self.classifier(f)


def camvid_preprocess(img_bgr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 BGR -> 1x3xHxW float32, ``(img - mean) / std / 255`` computed in float64 (bit-exact reference)."""
    x = (img_bgr.astype(np.float32) - np.asarray(CAMVID_MEAN_BGR)) / np.asarray(CAMVID_STD_BGR) / 255.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32))[None]


def build_espnet_camvid(weights_path: Union[str, Path, None] = None, pretrained: bool = True) -> ESPNet:
    """ESPNet p=2,q=8 CamVid (12 logits incl. void) in eval mode, bundled weights loaded strictly."""
    model = ESPNet(12, skip="o0c")
    if pretrained or weights_path is not None:
        path = Path(weights_path) if weights_path is not None else weights_root() / ESPNET_CAMVID_ENTRY["weights_file"]
        load_state_dict_checked(model, path, ESPNET_CAMVID_ENTRY["sha256"], "ESPNet-CamVid")
    return model.eval()


def build_espnet_cityscapes(weights_path: Union[str, Path, None] = None, pretrained: bool = True) -> ESPNet:
    """ESPNet p=2,q=8 Cityscapes (20 logits: 19 train ids + ignore) in eval mode, weights loaded strictly."""
    model = ESPNet(20, skip="o0")
    if pretrained or weights_path is not None:
        path = (Path(weights_path) if weights_path is not None
                else weights_root() / ESPNET_CITYSCAPES_ENTRY["weights_file"])
        load_state_dict_checked(model, path, ESPNET_CITYSCAPES_ENTRY["sha256"], "ESPNet-Cityscapes")
    return model.eval()
