"""Conversions that used to write wrong weights with exit 0, refuse a correct one, or lose what the file said: each
case failed on the previous main and is checked here through the library and the real CLI."""

import os
import stat

import pytest
import torch
from cli_helpers import one_line_error
from cli_helpers import run_command as run_cli
from convert_helpers import OURS, Detector, assert_deploy_equivalent, tiny
from torch import nn

from repvgg_tools import randomize_batchnorm, verify_equivalence
from repvgg_tools.cli import convert as convert_cli
from repvgg_tools.conversion.api import ConversionError, convert_state_dict, load_model
from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout
from repvgg_tools.io.checkpoint import atomic_write, shared_memory_keys


# ------------------------------------------------------------------------------------------ shared storage
def views_of_one_buffer(sd: dict) -> dict:
    """The same tensors as views of one flat buffer (how some exporters and ``torch.save`` of slices write them)."""
    flat = torch.cat([v.reshape(-1).float() for v in sd.values() if v.is_floating_point()])
    out, offset = {}, 0
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = flat[offset:offset + v.numel()].view(v.shape)
            offset += v.numel()
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("verify", [False, True])
def test_views_of_one_buffer_convert_correctly(tmp_path, verify):
    train = tiny(7, widths=(64, 64, 128, 128, 256))  # kernels larger than a memory page, so pages are released
    src, dst = tmp_path / "flat.pth", tmp_path / "out.pth"
    torch.save(views_of_one_buffer(train.state_dict()), src)
    assert len({t.untyped_storage().data_ptr() for t in torch.load(src).values() if t.is_floating_point()}) == 1
    proc = run_cli("repvgg_tools.cli.convert", src, dst, *([] if verify else ["--no-verify"]))
    assert proc.returncode == 0, proc.stderr
    assert_deploy_equivalent(train, torch.load(dst), widths=(64, 64, 128, 128, 256))


def test_tied_tensors_are_never_overwritten_in_place():
    """Two keys that are one tensor: fusing in place into one would change the other."""
    sd = dict(tiny(8).state_dict())
    kernels = [k for k in sd if k.endswith("branch_3x3.conv.weight")]
    first, second = next((a, b) for a in kernels for b in kernels if a < b and sd[a].shape == sd[b].shape)
    sd[second] = sd[first]
    assert {first, second} <= shared_memory_keys(sd)
    expected, _ = convert_state_dict(dict(sd))  # not in place
    got, _ = convert_state_dict(dict(sd), inplace=True)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------- forced layout, nothing to fuse
@pytest.mark.slow
def test_forced_layout_that_matches_nothing_is_an_error(tmp_path):
    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(tiny().state_dict(), src)
    one_line_error(run_cli("repvgg_tools.cli.convert", src, dst, "--layout", "torchvision"), 2, "matches nothing")
    one_line_error(run_cli("repvgg_tools.cli.convert", src, dst, "--layout", "timm"), 2, "no RepVGG blocks")
    assert not dst.exists()


def test_arch_forced_on_a_whole_model_checkpoint_is_an_error():
    with pytest.raises(ConversionError, match="does not apply"):
        convert_state_dict(Detector().state_dict(), arch="repvgg_a0")


def test_nothing_to_fuse_says_so(tmp_path):
    src, dst = tmp_path / "deploy.pth", tmp_path / "out.pth"
    torch.save(tiny(deploy=True).state_dict(), src)
    one_line_error(run_cli("repvgg_tools.cli.convert", src, dst), 2, "nothing to fuse")
    assert not dst.exists()


# ------------------------------------------------------------------------------------- load_model and strides
def _saved_with_output_stride(tmp_path, output_stride: int, metadata: bool):
    train = tiny(9, output_stride=output_stride)
    path = tmp_path / f"os{output_stride}_{metadata}.pth"
    extras = {"arch": "custom", "model_kwargs": {"output_stride": output_stride}} if metadata else {}
    torch.save({"state_dict": train.state_dict(), **extras}, path)
    return train, path


def test_load_model_reads_the_saved_model_kwargs(tmp_path):
    train, path = _saved_with_output_stride(tmp_path, 16, metadata=True)
    for deploy in (True, False):
        model, info = load_model(path, deploy=deploy)
        assert info["model_kwargs"] == {"output_stride": 16}
        assert verify_equivalence(train, model, (2, 3, 32, 32)).passed


def test_load_model_refuses_strides_it_cannot_know(tmp_path):
    train, path = _saved_with_output_stride(tmp_path, 8, metadata=False)
    with pytest.raises(ConversionError, match="output_stride"):
        load_model(path)
    model, _ = load_model(path, model_kwargs={"output_stride": 8})
    assert verify_equivalence(train, model, (2, 3, 32, 32)).passed


@pytest.mark.slow
def test_export_needs_and_honours_the_output_stride(tmp_path):
    import onnxruntime  # noqa: F401
    train, path = _saved_with_output_stride(tmp_path, 8, metadata=False)
    out = tmp_path / "m.onnx"
    args = [path, out, "--input-size", "32", "--no-simplify"]
    one_line_error(run_cli("repvgg_tools.cli.export", *args), 2, "--output-stride")
    proc = run_cli("repvgg_tools.cli.export", *args, "--output-stride", "8")
    assert proc.returncode == 0, proc.stderr
    assert "conversion (deploy vs training form, float64)" in proc.stdout
    import onnxruntime as ort

    x = torch.randn(2, 3, 32, 32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = train(x)
    assert (torch.from_numpy(got) - want).abs().max() / want.abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- BatchNorm eps
def _eps_model(eps: float) -> nn.Module:
    model = tiny(10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
    return randomize_batchnorm(model, 3).eval()


@pytest.mark.slow
def test_bn_eps_from_metadata_and_flag(tmp_path):
    train = _eps_model(1e-3)
    with_meta, bare = tmp_path / "meta.pth", tmp_path / "bare.pth"
    torch.save({"state_dict": train.state_dict(), "bn_eps": 1e-3}, with_meta)
    torch.save(train.state_dict(), bare)
    proc = run_cli("repvgg_tools.cli.convert", with_meta, tmp_path / "a.pth")
    assert proc.returncode == 0 and "bn eps:      0.001 (checkpoint metadata)" in proc.stdout, proc.stderr
    assert_deploy_equivalent(train, torch.load(tmp_path / "a.pth")["state_dict"])
    assert run_cli("repvgg_tools.cli.convert", bare, tmp_path / "b.pth", "--bn-eps", "1e-3").returncode == 0
    assert_deploy_equivalent(train, torch.load(tmp_path / "b.pth"))
    # without the eps, the conversion is consistent with 1e-5 but not with the trained model: why the flag exists
    wrong, _ = convert_state_dict(train.state_dict())
    deploy = tiny(deploy=True)
    deploy.load_state_dict(wrong)
    assert not verify_equivalence(train, deploy, (2, 3, 32, 32)).passed
    one_line_error(run_cli("repvgg_tools.cli.convert", bare, tmp_path / "c.pth", "--bn-eps", "-1"), 2, "eps")


# ---------------------------------------------------------------------------------------- the verifier fails
def _break_fusion(monkeypatch, how: str) -> None:
    """Make the fusion write a wrong answer: one kernel tap off, or a bias off by 1e-3 relative."""
    from repvgg_tools.fusion import core as fusion

    real = fusion.fuse_branches

    def wrong(branches, dtype=None):
        kernel, bias = real(branches, dtype)
        kernel, bias = kernel.clone(), bias.clone()
        if how == "tap":
            kernel[0, 0, 0, 0] += kernel.abs().max()
        else:
            bias += 1e-3 * bias.abs().max()
        return kernel, bias

    monkeypatch.setattr(fusion, "fuse_branches", wrong)


@pytest.mark.parametrize("how", ["tap", "bias"])
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_verifier_fails_a_wrong_fusion(tmp_path, monkeypatch, capsys, how, mode):
    model = tiny(11) if mode == "model" else randomize_batchnorm(Detector(), 11).eval()
    src, dst, report = tmp_path / "in.pth", tmp_path / "out.pth", tmp_path / "r.json"
    torch.save(model.state_dict(), src)
    _break_fusion(monkeypatch, how)
    assert convert_cli.main([str(src), str(dst), "--json", str(report)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: verification failed") and not dst.exists()
    import json

    data = json.loads(report.read_text())
    assert data["verify_mode"] == mode and data["passed"] is False and data["max_rel"] > 1e-5
    # the wrong fusion is written exactly rounded: check (a) fails it, check (b) has nothing to say (more wrong
    # fusions, and wrong roundings, in test_verify_contract.py; timm's repvgg_d2se there too)
    assert data["rounding_mismatches"] == [] and data["rounding_checked"] == 2 * data["blocks_fused"]
    assert data["rounded_max_rel"] > 1e-5  # the old figure, reported


# ------------------------------------------------------------------------------- file names in messages
def test_messages_name_the_keys_of_the_file():
    sd = rename_layout(tiny().state_dict(), OURS, LAYOUTS["official"])
    sd["stage1.1.rbr_identity.running_var"] = -sd["stage1.1.rbr_identity.running_var"].abs() - 1
    with pytest.raises(ConversionError, match=r"stage1\.1\.rbr_identity\.running_var is negative"):
        convert_state_dict(sd)
    del sd["stage1.1.rbr_identity.running_var"]
    with pytest.raises(ConversionError, match=r"stage1\.1\.rbr_identity: BatchNorm has no running statistics"):
        convert_state_dict(sd)


# ----------------------------------------------------------------------------------------------- atomic writes
def test_outputs_get_umask_permissions_and_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # what open() gives under umask 027 (mkstemp gives 0600)
    assert len(synced) == 2  # the file, then its directory
    os.chmod(path, 0o604)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"y"), force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604  # an overwritten file keeps its mode
