"""torchvision Faster R-CNN / RetinaNet / DeepLabV3 on RepVGG backbones: train briefly, convert, same outputs."""

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision", exc_type=ImportError)

from repvgg_tools import ConvBN, create_model, load_checkpoint, reparameterize, save_checkpoint  # noqa: E402
from repvgg_tools.detection import (  # noqa: E402
    BACKBONE_PREFIX,
    compare_detections,
    repvgg_deeplabv3,
    repvgg_fasterrcnn,
    repvgg_retinanet,
    synthetic_shapes,
)
from repvgg_tools.models import RepVGG  # noqa: E402
from repvgg_tools.models.features import load_backbone_weights  # noqa: E402
from repvgg_tools.verify import compare_outputs, randomize_batchnorm  # noqa: E402

SIZE = 96
WIDTHS, DEPTHS = (8, 8, 16, 32, 64), (1, 1, 2, 2, 1)
FRCNN_KW = dict(
    fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128), min_size=SIZE, max_size=SIZE, box_score_thresh=0.01,
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=64, box_batch_size_per_image=64,
)
CONVERT = "repvgg_tools.cli.convert"


def needs_converter(fn):
    """The converter is this project's own code: its absence is a failure, not a skip."""
    def wrapped(*args, **kwargs):
        assert importlib.util.find_spec(CONVERT) is not None, f"the repvgg-convert CLI ({CONVERT}) is missing"
        return fn(*args, **kwargs)
    return functools.wraps(fn)(wrapped)


def tiny_body(out_indices, deploy=False, **kw) -> RepVGG:
    return RepVGG(WIDTHS, DEPTHS, features_only=True, out_indices=out_indices, deploy=deploy, **kw)


def frcnn(deploy=False, **kw):
    return repvgg_fasterrcnn(tiny_body((1, 2, 3, 4), deploy=deploy), 4, **FRCNN_KW, **kw)


def train_steps(model, images, targets, steps, lr=2e-3):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    return model.eval()


def boxes_only(targets):
    return [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


def _dets():
    """Two images: three detections, then none."""
    return [{"boxes": torch.tensor([[10.0, 10, 40, 40], [50, 20, 90, 60], [5, 60, 30, 95]]),
             "scores": torch.tensor([0.9, 0.7, 0.4]), "labels": torch.tensor([1, 2, 1])},
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]


def _changed(change):
    dets = copy.deepcopy(_dets())
    change(dets[0])
    return dets


@pytest.mark.parametrize("change,why", [
    (lambda d: d["boxes"][1, 2].add_(0.5), "no partner"),  # a box moved beyond box_tol
    (lambda d: d["scores"][2].add_(1e-3), "no partner"),  # a score beyond score_tol
    (lambda d: d["labels"][0].fill_(3), "no partner"),  # another class
    (lambda d: d.update({k: v[:2] for k, v in d.items()}), "3 vs 2 detections"),  # a missing box
])
def test_compare_detections_rejects_wrong_detections(change, why):
    assert compare_detections(_dets(), _dets(), box_tol=0.1, score_tol=1e-4)["same"]
    # within tolerance, and near-equal scores swapped places: the same detections
    near = _changed(lambda d: (d["boxes"][0].add_(0.05), d["scores"][1].add_(5e-5)))
    swapped = _changed(lambda d: d.update({k: v[[1, 0, 2]] for k, v in d.items()}))
    for cand in (near, swapped):
        assert compare_detections(_dets(), cand, box_tol=0.1, score_tol=1e-4)["same"]
    result = compare_detections(_dets(), _changed(change), box_tol=0.1, score_tol=1e-4)
    assert not result["same"] and why in result["reason"], result


def assert_same_detections(ref, out, size=SIZE):
    result = compare_detections(ref, out, box_tol=1e-4 * size, score_tol=1e-5)
    assert result["same"], result["reason"]
    assert result["detections"] > 0
    return result


@pytest.fixture(scope="module")
def trained_frcnn():
    """A tiny Faster R-CNN trained 20 steps (randomized BN first; fewer leave no score above the threshold),
    in eval mode, and its reference detections."""
    torch.manual_seed(0)
    model = frcnn()
    randomize_batchnorm(model, seed=1)
    images, targets = synthetic_shapes(4, SIZE, num_classes=3, seed=0)
    train_steps(model, images, boxes_only(targets), steps=20)
    test_images, _ = synthetic_shapes(2, SIZE, num_classes=3, seed=1)
    with torch.no_grad():
        ref = model(test_images)
    return model, test_images, ref


def test_fasterrcnn_reparameterize_same_detections(trained_frcnn):
    model, images, ref = trained_frcnn
    deployed = reparameterize(model)
    assert deployed is not model and not deployed.training
    body = deployed.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    with torch.no_grad():
        out = deployed(images)
        x = torch.stack(images)
        assert compare_outputs(body(x), model.backbone.body(x))[1] <= 1e-5
    assert_same_detections(ref, out)
    # heads untouched, backbone keys only renamed to the fused form
    before, after = model.state_dict(), deployed.state_dict()
    for k, v in before.items():
        if not k.startswith(BACKBONE_PREFIX):
            assert torch.equal(v, after[k]), k
    assert all(".reparam." in k for k in after if k.startswith(BACKBONE_PREFIX))
    # the deploy-form builder takes the converted weights strictly and gives the same detections
    plain = frcnn(deploy=True).eval()
    plain.load_state_dict(after, strict=True)
    with torch.no_grad():
        assert_same_detections(ref, plain(images))


def test_fasterrcnn_head_with_untraceable_bn_still_exact(caplog):
    """A BatchNorm outside nn.Sequential needs torch.fx, which cannot trace a detector: a warning, same results."""

    class ConvBNHead(nn.Module):
        def __init__(self, channels, out):
            super().__init__()
            self.convbn = ConvBN(channels, channels, 3, padding=1)
            self.fc = nn.Linear(channels * 49, out)

        def forward(self, x):
            return torch.relu(self.fc(torch.relu(self.convbn(x)).flatten(1)))

    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    torch.manual_seed(1)
    model = frcnn(box_head=ConvBNHead(32, 64), box_predictor=FastRCNNPredictor(64, 4)).eval()
    randomize_batchnorm(model, seed=2)
    images, _ = synthetic_shapes(2, SIZE, num_classes=3, seed=2)
    with torch.no_grad():
        ref = model(images)
    with caplog.at_level(logging.WARNING, logger="repvgg_tools.reparam"):
        deployed = reparameterize(model)
    assert "could not trace" in caplog.text
    # the fx fold cannot reach it; the graph fuser skips the untraceable detector and fuses its traceable parts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.roi_heads.box_head.modules())
    with torch.no_grad():
        assert_same_detections(ref, deployed(images))


def test_retinanet_reparameterize_same_detections():
    torch.manual_seed(2)
    model = repvgg_retinanet(
        tiny_body((2, 3, 4)), 4, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128), min_size=SIZE, max_size=SIZE,
        score_thresh=0.01, topk_candidates=100, detections_per_img=50,
    )
    randomize_batchnorm(model, seed=3)
    images, targets = synthetic_shapes(2, SIZE, num_classes=3, seed=3)
    train_steps(model, images, boxes_only(targets), steps=2)
    with torch.no_grad():
        ref = model(images)
        out = reparameterize(model)(images)
    assert_same_detections(ref, out)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplabv3_reparameterize_same_logits(output_stride):
    torch.manual_seed(3)
    model = repvgg_deeplabv3(tiny_body((3, 4), output_stride=output_stride), 4, aux_loss=True)
    assert model.backbone.body.feature_info.reduction() == [min(16, output_stride), output_stride]
    randomize_batchnorm(model, seed=output_stride)
    images, targets = synthetic_shapes(4, 64, num_classes=3, seed=4)
    x, y = torch.stack(images), torch.stack([t["mask"] for t in targets])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        out = model(x)
        loss = nn.functional.cross_entropy(out["out"], y) + 0.5 * nn.functional.cross_entropy(out["aux"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    deployed = reparameterize(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())  # ASPP's BNs fold too
    with torch.no_grad():
        ref, got = model(x), deployed(x)
    assert ref["out"].shape == (4, 4, 64, 64)
    for key in ("out", "aux"):
        assert compare_outputs(got[key], ref[key])[1] <= 1e-5, key
    # the deploy-form builder has a plain backbone and the heads as trained (what repvgg-convert writes): it takes
    # a model whose backbone alone was reparameterized; reparameterizing the empty builder gives the fully folded
    # layout of reparameterize(model)
    def build_plain():
        body = tiny_body((3, 4), deploy=True, output_stride=output_stride)
        return repvgg_deeplabv3(body, 4, aux_loss=True).eval()

    backbone_only = copy.deepcopy(model)
    backbone_only.backbone.body = reparameterize(model.backbone.body)
    plain = build_plain()
    plain.load_state_dict(backbone_only.state_dict(), strict=True)
    folded = reparameterize(build_plain())
    folded.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert compare_outputs(plain(x)["out"], ref["out"])[1] <= 1e-5
        assert compare_outputs(folded(x)["out"], ref["out"])[1] <= 1e-5


def test_deeplabv3_by_name_and_frozen_backbone():
    model = repvgg_deeplabv3("repvgg_a0", 3, output_stride=16, frozen_stages=1, norm_eval=True).train()
    body = model.backbone.body
    assert body.feature_info.channels() == [1280] and body.feature_info.reduction() == [16]
    assert not body.stem.training and not body.stages[0].training and body.stages[1].training
    assert not any(p.requires_grad for p in body.stages[0].parameters())
    assert not any(m.training for m in body.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.classifier.training  # the head's own BNs are not the backbone's business
    with pytest.raises(ValueError, match="out_indices"):
        repvgg_deeplabv3(tiny_body((4,)), 3, aux_loss=True)


def test_fasterrcnn_loads_classifier_backbone(tmp_path):
    clf = RepVGG(WIDTHS, DEPTHS, num_classes=5).eval()
    randomize_batchnorm(clf, seed=9)
    save_checkpoint(clf.state_dict(), tmp_path / "clf.pth")
    model = frcnn().eval()
    skipped = load_backbone_weights(model.backbone.body, load_checkpoint(tmp_path / "clf.pth"))
    assert skipped and all(k.startswith("head.") for k in skipped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone.body(x)[-1], clf.forward_features(x))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert(src, dst):
    proc = subprocess.run([sys.executable, "-m", CONVERT, str(src), str(dst)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert dst.exists()
    return proc


@needs_converter
def test_detector_checkpoint_converts_with_cli(trained_frcnn, tmp_path):
    model, images, ref = trained_frcnn
    src, dst = tmp_path / "frcnn_train.pth", tmp_path / "frcnn_deploy.pth"
    save_checkpoint(model.state_dict(), src)
    digest = _sha(src)
    _convert(src, dst)
    assert _sha(src) == digest
    converted = load_checkpoint(dst)
    converted = converted.get("state_dict", converted) if isinstance(converted, dict) else converted
    plain = frcnn(deploy=True).eval()
    plain.load_state_dict(converted, strict=True)
    for k, v in model.state_dict().items():
        if not k.startswith(BACKBONE_PREFIX):
            assert torch.equal(v, converted[k]), k
    with torch.no_grad():
        assert_same_detections(ref, plain(images))


@needs_converter
def test_segmenter_checkpoint_converts_with_cli(tmp_path):
    torch.manual_seed(4)
    model = repvgg_deeplabv3(tiny_body((4,), output_stride=8), 3).eval()
    randomize_batchnorm(model, seed=11)
    src, dst = tmp_path / "seg.safetensors", tmp_path / "seg_deploy.safetensors"
    save_checkpoint(model.state_dict(), src)
    _convert(src, dst)
    plain = repvgg_deeplabv3(tiny_body((4,), deploy=True, output_stride=8), 3).eval()
    plain.load_state_dict(load_checkpoint(dst), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert compare_outputs(plain(x)["out"], model(x)["out"])[1] <= 1e-5


def test_vgg_backbone_detector_converts():
    torch.manual_seed(5)
    body = create_model("vgg11_bn", features_only=True, out_indices=(2, 3), in_chans=3)
    model = repvgg_fasterrcnn(body, 3, out_indices=(2, 3), **{**FRCNN_KW, "anchor_sizes": (16, 32, 64)}).eval()
    randomize_batchnorm(model, seed=6)
    images, _ = synthetic_shapes(1, SIZE, seed=5)
    with torch.no_grad():
        ref = model(images)
        assert_same_detections(ref, reparameterize(model)(images))


@pytest.mark.slow
def test_detector_example_script_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, str(root / "tools" / "detector_example.py")]
    env = dict(os.environ, PYTHONPATH=str(root))  # a checkout without installing
    report = tmp_path / "report.json"
    proc = subprocess.run(
        script + ["--tiny", "--steps", "2", "--image-size", "64", "--num-images", "4", "--latency-runs", "1",
                  "--threads", "1", "--out-dir", str(tmp_path), "--json", str(report)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["params"]["deploy"] < data["params"]["train"]
    assert data["reparameterize"]["same"] and data["reparameterize"]["backbone_max_rel_err"] <= 1e-5
    assert data["onnx"]["onnxruntime_max_rel_err"] <= 1e-4 and (tmp_path / "backbone_features.onnx").is_file()
    assert (tmp_path / "detector_train.pth").is_file()
    # existing outputs are not overwritten without --force; a missing directory is a one-line error
    for extra in (["--out-dir", str(tmp_path)], ["--out-dir", str(tmp_path / "missing")]):
        bad = subprocess.run(script + ["--tiny", "--steps", "0", "--image-size", "64"] + extra,
                             capture_output=True, text=True, timeout=300, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
