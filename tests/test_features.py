"""Feature backbones: feature_info, out_indices, output stride by dilation, fine-tuning modes, checkpoints, export."""

import importlib.util

import pytest
import torch
from torch import nn

from repvgg_tools import create_model, load_checkpoint, reparameterize, save_checkpoint
from repvgg_tools.models import RepVGG
from repvgg_tools.models.features import (
    FeatureInfo,
    load_backbone_weights,
    normalize_out_indices,
    output_stride_schedule,
)
from repvgg_tools.verify import randomize_batchnorm

TINY = dict(widths=(8, 16, 16, 32, 48), depths=(1, 2, 2, 3, 1))


def tiny(**kw) -> RepVGG:
    kw.setdefault("features_only", True)
    return RepVGG(TINY["widths"], TINY["depths"], **kw)


def per_map_rel_err(cands, refs) -> float:
    """Largest ``max|a-b| / max|b|`` over the feature maps, each map relative to its own scale."""
    assert len(cands) == len(refs)
    errs = []
    for c, r in zip(cands, refs, strict=True):
        assert c.shape == r.shape
        errs.append(float((c.double() - r.double()).abs().max() / r.double().abs().max()))
    return max(errs)


# ---------------------------------------------------------------------------------------------- feature_info


@pytest.mark.parametrize("name", ["repvgg_a0", "vgg11_bn"])
def test_feature_info_describes_the_returned_maps(name):
    model = create_model(name, features_only=True).eval()
    info = model.feature_info
    assert isinstance(info, FeatureInfo) and len(info) == 5 and info.out_indices == (0, 1, 2, 3, 4)
    # each returned map is the output of the module that feature_info names
    captured = {}
    for mod_name in info.module_name():
        model.get_submodule(mod_name).register_forward_hook(lambda m, i, o, n=mod_name: captured.__setitem__(n, o))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    assert isinstance(feats, list) and len(feats) == 5
    for f, mod_name, chs, red in zip(feats, info.module_name(), info.channels(), info.reduction(), strict=True):
        assert torch.equal(f, captured[mod_name])
        assert f.shape[1] == chs
        assert f.shape[-1] * red == 64 and f.shape[-2] * red == 64
    assert info.reduction() == [2, 4, 8, 16, 32]
    dicts = info.get_dicts()
    assert [set(d) >= {"num_chs", "reduction", "module"} for d in dicts] == [True] * 5
    assert not hasattr(model, "head") and not hasattr(model, "classifier")


def test_feature_info_matches_timm_repvgg():
    import timm
    ours = create_model("repvgg_a0", features_only=True).feature_info
    theirs = timm.create_model("repvgg_a0", features_only=True, pretrained=False).feature_info
    assert ours.channels() == theirs.channels()
    assert ours.reduction() == theirs.reduction()


def test_out_indices_select_and_prune():
    model = create_model("repvgg_a0", features_only=True, out_indices=(-3, 1)).eval()
    assert model.feature_info.out_indices == (1, 2)
    assert model.feature_info.channels() == [48, 96]
    assert len(model.stages) == 2  # stages after the last requested level are not built
    assert not any(k.startswith(("stages.2", "stages.3", "head")) for k in model.state_dict())
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 48, 16, 16), (1, 96, 8, 8)]
    assert normalize_out_indices(2) == (3, 4)
    for bad in [(5,), (-6,), ()]:
        with pytest.raises(ValueError, match="out_indices"):
            create_model("repvgg_a0", features_only=True, out_indices=bad)


def test_classifier_unchanged_and_bad_names():
    clf = create_model("repvgg_a0", num_classes=7).eval()
    assert clf(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("repvgg_zz", features_only=True)
    with pytest.raises(ValueError, match="output_stride"):
        create_model("vgg11", features_only=True, output_stride=16)
    with pytest.raises(ValueError, match="output_stride"):
        create_model("repvgg_a0", features_only=True, output_stride=4)


# ---------------------------------------------------------------------------------------------- reparameterize


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("variant", ["plain", "groups_se"])
def test_reparameterize_keeps_every_feature_map(output_stride, variant):
    kw = dict(layer_groups={2: 2, 4: 4, 6: 2}, se_ratio=0.25) if variant == "groups_se" else {}
    model = tiny(output_stride=output_stride, **kw).eval()
    randomize_batchnorm(model, seed=output_stride)
    deployed = reparameterize(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    assert len(ref) == 5
    assert per_map_rel_err(out, ref) <= 1e-5
    # a model built in deploy form has exactly the converted keys and reproduces the maps
    plain = tiny(output_stride=output_stride, deploy=True, **kw).eval()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert per_map_rel_err(plain(x), ref) <= 1e-5


def test_reparameterize_float64_and_full_size_a0():
    model = create_model("repvgg_a0", features_only=True, output_stride=8).eval()
    randomize_batchnorm(model, seed=3)
    x = torch.randn(1, 3, 64, 64)
    deployed = reparameterize(model)
    with torch.no_grad():
        assert per_map_rel_err(deployed(x), model(x)) <= 1e-5
    m64 = tiny(output_stride=16).double().eval()
    randomize_batchnorm(m64, seed=4)
    with torch.no_grad():
        assert per_map_rel_err(reparameterize(m64)(x.double()), m64(x.double())) <= 1e-12


def test_vgg_bn_features_fold_into_plain_vgg_layout():
    model = create_model("vgg11_bn", features_only=True, out_indices=(1, 3)).eval()
    randomize_batchnorm(model, seed=5)
    deployed = reparameterize(model)
    plain = create_model("vgg11", features_only=True, out_indices=(1, 3)).eval()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert per_map_rel_err(deployed(x), ref) <= 1e-5
        assert per_map_rel_err(plain(x), ref) <= 1e-5
    assert deployed.feature_info.channels() == [128, 512]
    assert deployed.feature_info.module_name() == plain.feature_info.module_name()


# ---------------------------------------------------------------------------------------------- output stride


@pytest.mark.parametrize(
    "output_stride, dilations", [(32, (1, 1, 1, 1, 1)), (16, (1, 1, 1, 1, 2)), (8, (1, 1, 1, 2, 4))],
)
def test_output_stride_replaces_stride_with_dilation(output_stride, dilations):
    model = tiny(output_stride=output_stride).eval()
    assert model.feature_info.reduction() == [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    blocks = [model.stem] + [stage for stage in model.stages]
    for level, (block_or_stage, dilation) in enumerate(zip(blocks, dilations, strict=True)):
        first = block_or_stage if level == 0 else block_or_stage[0]
        conv = first.branch_3x3.conv
        assert conv.dilation == (dilation, dilation) and conv.padding == (dilation, dilation)
        dilated_by_schedule = dilation > 1
        assert conv.stride == ((1, 1) if dilated_by_schedule else (2, 2))
        if level > 0:
            assert all(b.branch_3x3.conv.dilation == (dilation, dilation) for b in block_or_stage)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[-1] for f in feats] == [64 // r for r in model.feature_info.reduction()]
    assert output_stride_schedule((2,) * 5, (1,) * 5, output_stride)[1] == list(dilations)
    with pytest.raises(ValueError, match="dilations"):
        output_stride_schedule((2,) * 5, (1, 1, 1, 1, 2), 8)
    # explicit strides/dilations without output_stride are taken as given
    custom = tiny(strides=(2, 2, 2, 2, 1), dilations=(1, 1, 1, 1, 2))
    assert custom.feature_info.reduction() == [2, 4, 8, 16, 16]


# ---------------------------------------------------------------------------------------------- fine-tuning


def _bn_stats(module):
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = sum(f.square().mean() for f in model(x))
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("frozen_stages", [-1, 0, 2])
def test_frozen_stages_follow_mmpretrain(frozen_stages):
    model = tiny(frozen_stages=frozen_stages)
    modules = [model.stem, *model.stages]
    frozen = modules[: frozen_stages + 1]  # -1: none; 0: stem; k: stem + stages.0..k-1
    model.train()
    params_before = [[p.clone() for p in m.parameters()] for m in modules]
    stats_before = [_bn_stats(m) for m in modules]
    _train_step(model, torch.randn(2, 3, 32, 32))
    for i, m in enumerate(modules):
        is_frozen = i < len(frozen)
        assert m.training is not is_frozen
        assert all(p.requires_grad is not is_frozen for p in m.parameters())
        same_params = all(torch.equal(a, b) for a, b in zip(params_before[i], m.parameters(), strict=True))
        same_stats = all(torch.equal(a, b) for a, b in zip(stats_before[i], _bn_stats(m), strict=True))
        assert same_params is is_frozen and same_stats is is_frozen
    model.eval()
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="frozen_stages"):
        tiny(frozen_stages=5)


def test_frozen_stages_survive_reparameterize_and_train():
    deployed = reparameterize(tiny(frozen_stages=1).eval()).train()
    assert not deployed.stem.training and not deployed.stages[0].training and deployed.stages[1].training
    assert not deployed.stem.reparam.weight.requires_grad and deployed.stages[1][0].reparam.weight.requires_grad


def test_norm_eval_keeps_running_stats_while_weights_train():
    model = tiny(norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.training and model.stem.training
    stats = _bn_stats(model)
    weight = model.stages[1][0].branch_3x3.conv.weight.clone()
    _train_step(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(model), strict=True))
    assert not torch.equal(weight, model.stages[1][0].branch_3x3.conv.weight)
    # without norm_eval the same step updates the statistics
    plain = tiny().train()
    before = _bn_stats(plain)
    _train_step(plain, torch.randn(2, 3, 32, 32))
    assert not all(torch.equal(a, b) for a, b in zip(before, _bn_stats(plain), strict=True))


def test_vgg_frozen_stages_and_norm_eval():
    model = create_model("vgg11_bn", features_only=True, out_indices=(0, 1, 2), frozen_stages=0, norm_eval=True)
    model.train()
    first_conv, later_conv = model.features[0], model.features[4]
    assert not first_conv.weight.requires_grad and later_conv.weight.requires_grad
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------------- checkpoints


def test_classifier_checkpoint_loads_into_features_model(tmp_path):
    clf = create_model("repvgg_a0", num_classes=10).eval()
    randomize_batchnorm(clf, seed=7)
    path = tmp_path / "clf.safetensors"
    save_checkpoint(clf.state_dict(), path)
    sd = load_checkpoint(path)
    feats = create_model("repvgg_a0", features_only=True, out_indices=(2, 4)).eval()
    skipped = load_backbone_weights(feats, sd)
    assert sorted(skipped) == sorted(k for k in sd if k.startswith("head."))
    # strict=False works too: only the head is unexpected
    missing, unexpected = create_model("repvgg_a0", features_only=True).load_state_dict(sd, strict=False)
    assert missing == [] and all(k.startswith("head.") for k in unexpected)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(feats(x)[-1], clf.forward_features(x))
    # a deploy checkpoint does not fit a training-form backbone: a clear error
    with pytest.raises(ValueError, match="lacks"):
        load_backbone_weights(feats, reparameterize(clf).state_dict())
    # under a prefix (a detector's checkpoint)
    prefixed = {f"backbone.body.{k}": v for k, v in reparameterize(clf).state_dict().items()}
    plain = create_model("repvgg_a0", features_only=True, out_indices=(2, 4), deploy=True).eval()
    load_backbone_weights(plain, prefixed, prefix="backbone.body.")
    with torch.no_grad():
        assert per_map_rel_err(plain(x), feats(x)) <= 1e-5


# ---------------------------------------------------------------------------------------------- export


def test_features_export_torch_export_and_onnx(tmp_path):
    import onnxruntime as ort
    model = reparameterize(tiny(out_indices=(1, 2, 3, 4), output_stride=16).eval())
    x = torch.randn(2, 3, 64, 64)
    # torch.export (the graph the dynamo ONNX exporter starts from): a flat list of tensors, dynamic batch
    batch = torch.export.Dim("batch", min=1, max=16)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    x3 = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = model(x3)
        assert per_map_rel_err(list(exported.module()(x3)), ref) <= 1e-6
    path = tmp_path / "features.onnx"
    names = [f"feat{i}" for i in range(4)]
    if importlib.util.find_spec("onnxscript") is not None:
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=names,
                          dynamic_shapes={"x": {0: batch}}, external_data=False)
    else:  # the dynamo exporter needs onnxscript; the TorchScript exporter does not
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=names,
                          dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    outs = session.run(None, {"x": x3.numpy()})
    assert per_map_rel_err([torch.from_numpy(o) for o in outs], ref) <= 1e-4
