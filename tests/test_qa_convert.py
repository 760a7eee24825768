"""``repvgg-convert`` on QARepVGG checkpoints: ours, the reference implementation's key names (cxxgtxy/QARepVGG
``QARepVGGBlockV2``: ``rbr_dense.{conv,bn}``, bare ``rbr_1x1``, post-sum ``bn``, ``stage0..4``, ``linear``), and a
YOLOv6-style whole detector saved as a pickled fp16 module."""


import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_convert as run_cli
from convert_helpers import DEPTHS, GROUPS, WIDTHS
from torch import nn

from repvgg_tools import create_model, randomize_batchnorm, verify_equivalence
from repvgg_tools.blocks import QARepVGGBlock
from repvgg_tools.conversion.api import convert_state_dict
from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout
from repvgg_tools.models import RepVGG

OURS = LAYOUTS["ours"]


def qa_tiny(seed: int, deploy: bool = False) -> RepVGG:
    torch.manual_seed(seed)
    model = RepVGG(WIDTHS, DEPTHS, GROUPS, num_classes=5, block=QARepVGGBlock, deploy=deploy)
    return randomize_batchnorm(model, seed).eval()



@pytest.mark.parametrize("layout", ["ours", "official"])
def test_qa_checkpoint_converts_and_loads_strictly(tmp_path, layout):
    train = qa_tiny(1)
    sd = rename_layout(train.state_dict(), OURS, LAYOUTS[layout])
    if layout == "official":  # the reference's names, read from its source
        assert {"stage1.1.rbr_1x1.weight", "stage1.1.bn.running_var", "stage1.1.rbr_dense.bn.weight"} <= set(sd)
    src, dst = tmp_path / "qa.pth", tmp_path / "qa_deploy.pth"
    torch.save({"model": sd, "model_ema": sd, "epoch": 3}, src)
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert "custom QARepVGG" in proc.stdout and "verify:      model, float64" in proc.stdout
    out = torch.load(dst, weights_only=True)["model"]
    deploy = qa_tiny(1, deploy=True)
    deploy.load_state_dict(rename_layout(out, LAYOUTS[layout], OURS), strict=True)
    assert verify_equivalence(train, deploy, (2, 3, 32, 32)).passed


def test_zoo_qa_model_is_recognized():
    train = randomize_batchnorm(create_model("qarepvgg_a0", num_classes=4), 2).eval()
    deploy_sd, report = convert_state_dict(train.state_dict())
    assert report.arch == "qarepvgg_a0" and report.max_rel < 1e-6
    deploy = create_model("qarepvgg_a0", num_classes=4, deploy=True)
    deploy.load_state_dict(deploy_sd, strict=True)
    assert verify_equivalence(train, deploy, (1, 3, 32, 32)).passed


def test_qa_stride2_block_that_keeps_its_channels_has_no_identity():
    """Stage 1 of A0 keeps 48 channels at stride 2: the position says there is no identity branch there."""
    train = randomize_batchnorm(create_model("qarepvgg_a0", num_classes=4), 3).eval()
    assert train.stages[0][0].branch_identity is None and train.stages[0][0].in_ch == train.stages[0][0].out_ch
    _, report = convert_state_dict(rename_layout(train.state_dict(), OURS, LAYOUTS["official"]))
    assert report.passed


class Y6QABlock(nn.Module):
    """YOLOv6's QARepVGGBlock module tree: ``rbr_dense.{conv,bn}``, bare ``rbr_1x1``, ``rbr_identity`` (nn.Identity,
    no tensors), post-sum ``bn``; ReLU after."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.rbr_dense = nn.Sequential()
        self.rbr_dense.add_module("conv", nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
        self.rbr_dense.add_module("bn", nn.BatchNorm2d(cout))
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.rbr_identity = nn.Identity() if cin == cout and stride == 1 else None
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return F.relu(self.bn(out))


class Y6Detector(nn.Module):
    """A detector-shaped whole model: QA blocks deep inside a backbone, plus a head with its own conv+BN."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = Y6QABlock(3, 8, 2)
        self.backbone.ERBlock_2 = nn.Sequential(Y6QABlock(8, 16, 2), nn.Sequential(Y6QABlock(16, 16, 1),
                                                                                     Y6QABlock(16, 16, 1)))
        self.detect = nn.Sequential(nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6))


def test_yolov6_style_whole_detector_pickled_in_fp16(tmp_path):
    model = randomize_batchnorm(Y6Detector(), 4).eval()
    src, dst = tmp_path / "best_ckpt.pt", tmp_path / "deploy.pt"
    torch.save({"model": Y6Detector().half(), "ema": model.half(), "updates": 10, "epoch": 3}, src)
    proc = run_cli(src, dst, "--ema")
    assert proc.returncode == 0, proc.stderr
    assert "verify:      blocks, float64" in proc.stdout and "float16 weights" in proc.stdout
    assert "Y6QABlock" in proc.stdout  # the report names the classes it read as data
    out = torch.load(dst, weights_only=True)["state_dict"]
    assert "backbone.ERBlock_2.1.0.rbr_reparam.weight" in out and "detect.1.running_var" in out  # head carried
    for name, block in model.float().named_modules():
        if isinstance(block, Y6QABlock):
            x = torch.randn(2, block.rbr_dense.conv.in_channels, 9, 9)
            stride = block.rbr_dense.conv.stride
            fused = F.relu(F.conv2d(x, out[f"{name}.rbr_reparam.weight"].float(),
                                    out[f"{name}.rbr_reparam.bias"].float(), stride, 1))
            with torch.no_grad():
                ref = block(x)
            assert ((fused - ref).abs().max() / ref.abs().max()) < 1e-2  # float16 weights
