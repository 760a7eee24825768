"""The conversion verifier's contract (docs/contract.md): (a) the float64 fusion reproduces the training form, at
one tolerance for every dtype; (b) every written tensor is that fusion rounded once, bit for bit, after the walk.
Each check is fed wrong answers the other cannot see, in both modes (``model``: a classifier; ``blocks``: a detector
whose blocks are checked one by one)."""

import dataclasses

import pytest
import torch
from convert_helpers import Detector, tiny
from torch import nn

from repvgg_tools import randomize_batchnorm
from repvgg_tools.conversion import walk as convert_walk
from repvgg_tools.conversion.api import VerificationError, convert_state_dict
from repvgg_tools.conversion.branches import BranchBN
from repvgg_tools.conversion.check import FUSION_RTOL
from repvgg_tools.fusion import core as fusion

MODES = ["model", "blocks"]


def _state_dict(mode: str) -> dict:
    model = tiny(11) if mode == "model" else randomize_batchnorm(Detector(), 11).eval()
    return dict(model.state_dict())


def _failed(sd: dict, **kw):
    with pytest.raises(VerificationError) as info:
        convert_state_dict(sd, **kw)
    return info.value.report, str(info.value)


# ------------------------------------------------------------------------------- (a) wrong fusions, exactly rounded
def _wrap_fuse_into(monkeypatch, change) -> None:
    """Fuse every block from ``change(parts)`` instead of its real branches (what a fusion bug reading the wrong
    statistic or dropping a branch does); the verifier's references still come from the real tensors."""
    real = convert_walk.fuse_into

    def wrong(out_w, out_b, parts, eps, where, exact=None):
        real(out_w, out_b, change(parts), eps, where, exact)

    monkeypatch.setattr(convert_walk, "fuse_into", wrong)


def _wrong_eps(monkeypatch) -> None:  # the BatchNorm eps off by 1e-3
    real = fusion.fuse_branches

    def wrong(branches, dtype=None):
        return real([(k, b, None if bn is None else {**bn, "eps": bn["eps"] + 1e-3}) for k, b, bn in branches], dtype)

    monkeypatch.setattr(fusion, "fuse_branches", wrong)


def _no_identity(monkeypatch) -> None:  # the identity branch dropped
    _wrap_fuse_into(monkeypatch, lambda p: dataclasses.replace(p, identity=False, identity_bn=None))


def _wrong_mean(monkeypatch) -> None:  # one running mean of the 3x3 branch off by 1e-3
    def change(p):
        bn = p.main.bn
        mean = bn.running_mean.clone()
        mean[0] += 1e-3
        return dataclasses.replace(p, main=dataclasses.replace(p.main, bn=BranchBN(mean, bn.running_var, bn.weight,
                                                                                    bn.bias)))

    _wrap_fuse_into(monkeypatch, change)


def _one_weight(monkeypatch) -> None:  # one weight of the first fused kernel off by 1e-4 relative
    real, calls = fusion.fuse_branches, []

    def wrong(branches, dtype=None):
        kernel, bias = real(branches, dtype)
        if not calls:
            kernel = kernel.clone()
            kernel[0, 0, 1, 1] *= 1 + 1e-4
        calls.append(1)
        return kernel, bias

    monkeypatch.setattr(fusion, "fuse_branches", wrong)


WRONG_FUSIONS = {"eps": _wrong_eps, "no_identity": _no_identity, "mean": _wrong_mean, "one_weight": _one_weight}


@pytest.mark.parametrize("how", list(WRONG_FUSIONS))
@pytest.mark.parametrize("mode", MODES)
def test_check_a_fails_every_wrong_fusion(monkeypatch, mode, how):
    """The written tensors are the wrong fusion rounded once, so (b) passes: only (a) can see these."""
    sd = _state_dict(mode)
    WRONG_FUSIONS[how](monkeypatch)
    report, message = _failed(sd)
    assert report.verify_mode == mode and report.passed is False
    assert report.max_rel > 100 * FUSION_RTOL and not report.fusion_passed
    assert not report.rounding_mismatches and report.rounding_checked == 2 * report.blocks_fused
    assert message.startswith("verification failed: the fusion is not exact")


# -------------------------------------------------------------------------- (b) right fusion, wrongly written
def _write_wrong(monkeypatch, how: str) -> None:
    """Fuse correctly, then spoil what is written (never the float64 fusion the verifier gets)."""
    real, outputs = convert_walk.fuse_into, []

    def wrong(out_w, out_b, parts, eps, where, exact=None):
        real(out_w, out_b, parts, eps, where, exact)
        outputs.append((out_w, out_b))
        if how == "ulp" and len(outputs) == 1:  # one weight one unit in the last place off
            flat = out_w.view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))
        elif how == "twice" and len(outputs) == 1:  # rounded twice: through float16 on its way
            out_w.copy_(out_w.half())
        elif how == "clobbered" and len(outputs) == 3:  # a later block writes into an earlier block's output
            outputs[0][1][0] = torch.nextafter(outputs[0][1][0], torch.tensor(float("-inf")))

    monkeypatch.setattr(convert_walk, "fuse_into", wrong)


@pytest.mark.parametrize("how", ["ulp", "twice", "clobbered"])
@pytest.mark.parametrize("mode", MODES)
def test_check_b_fails_a_wrong_rounding_that_check_a_cannot_see(monkeypatch, mode, how):
    sd = _state_dict(mode)
    _write_wrong(monkeypatch, how)
    report, message = _failed(sd)
    assert report.fusion_passed and report.max_rel < 1e-13  # (a) judges the float64 fusion, which is right
    name = "bias" if how == "clobbered" else "kernel"
    assert len(report.rounding_mismatches) == 1 and report.rounding_mismatches[0].endswith(name)
    assert "written tensors are not the float64 fusion rounded once" in message
    if how != "twice":  # one ulp: the old check, a forward with the written weights, passed it
        assert report.rounded_max_rel < 1e-5


# ------------------------------------------------------------------------------------------ correct conversions
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_correct_conversions_pass_one_tolerance_in_every_dtype(mode, dtype):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _state_dict(mode).items()}
    _, report = convert_state_dict(sd)
    assert report.passed and report.verify_mode == mode and report.rtol == FUSION_RTOL
    assert report.max_rel < 1e-13 and not report.rounding_mismatches and report.rounding_checked == 16
    assert (report.rounded_max_rel < 1e-13) if dtype == torch.float64 else (report.rounded_max_rel > 1e-9)
    lines = "\n".join(report.summary_lines())
    assert "rounded once" in lines and "not judged" in lines
    data = report.as_dict()
    assert {"max_rel", "rounded_max_rel", "rounding_checked", "rounding_mismatches"} <= set(data)


def randomize_bn(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine parameters from a seeded generator, on top of timm's initialisation: sized so
    that repvgg_d2se is ill-conditioned (its forward with fp32-rounded weights lands up to 2e-5 from the float64
    training form) without being chaotic (wider statistics make even two float64 forwards of it disagree)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.mark.slow
def test_timm_repvgg_d2se_passes_on_every_seed():
    """What the old contract (the forward with the written fp32 weights, judged at 1e-5) refused on some seeds: the
    fusion is exact on all of them."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("repvgg_d2se", pretrained=False).eval()
    rounded = []
    for seed in range(10):
        randomize_bn(model, seed)
        _, report = convert_state_dict(model.state_dict())
        assert report.passed and report.verify_mode == "model" and report.layout == "timm", seed
        assert report.max_rel < 1e-11 and not report.rounding_mismatches and report.rounding_checked == 96, seed
        rounded.append(report.rounded_max_rel)
    assert max(rounded) > 1e-5  # the old figure: rounding noise the network amplifies, reported only
