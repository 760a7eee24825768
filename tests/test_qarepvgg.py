"""QARepVGG: the block, its fusion (post-sum BN folded through the summed bias), the zoo, training L2, export."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repvgg_tools.models as zoo
from repvgg_tools import create_model, fold_conv_bn, list_models, randomize_batchnorm, reparameterize
from repvgg_tools.blocks import ConvBN, QARepVGGBlock, RepVGGBlock, SEBlock, bn_tensors
from repvgg_tools.fusion.core import fuse_branches, fuse_qa_branches
from repvgg_tools.training.regularizers import custom_l2, param_groups
from repvgg_tools.verify import compare_outputs, verify_equivalence

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
QA_NAMES = [f"qarepvgg_{n}" for n in ("a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g2", "b2g4", "b3",
                                      "b3g2", "b3g4")]
INPUT = (1, 3, 32, 32)  # survives the five stride-2 stages (32 -> 1)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [model.stem, *(b for stage in model.stages for b in stage)]


# ------------------------------------------------------------------------------------------------ fusion math
def _bn(c: int, gen: torch.Generator) -> dict:
    r = torch.rand(4, c, generator=gen, dtype=torch.float64)
    return {"running_mean": torch.randn(c, generator=gen, dtype=torch.float64), "running_var": r[0] + 0.5,
            "eps": 1e-3, "bn_weight": r[1] + 0.5, "bn_bias": r[2] - 0.5}


@pytest.mark.parametrize("groups, has_1x1, has_id", [(1, True, True), (2, True, False), (4, False, True)])
def test_fuse_qa_branches_is_the_papers_formula(groups, has_1x1, has_id):
    """W' = (W3*g3/s3 + pad(W1) + I) * g/s, b' = beta + (b3 - mu) * g/s, written out independently."""
    gen = torch.Generator().manual_seed(groups)
    c = 8
    w3 = torch.randn(c, c // groups, 3, 3, generator=gen, dtype=torch.float64)
    w1 = torch.randn(c, c // groups, 1, 1, generator=gen, dtype=torch.float64)
    bn3, post = _bn(c, gen), _bn(c, gen)
    t3 = bn3["bn_weight"] / (bn3["running_var"] + bn3["eps"]).sqrt()
    b3 = bn3["bn_bias"] - bn3["running_mean"] * t3
    k = w3 * t3.view(-1, 1, 1, 1)
    if has_1x1:
        k[:, :, 1, 1] += w1[:, :, 0, 0]
    if has_id:
        for i in range(c):
            k[i, i % (c // groups), 1, 1] += 1.0
    t = post["bn_weight"] / (post["running_var"] + post["eps"]).sqrt()
    ref_k, ref_b = k * t.view(-1, 1, 1, 1), post["bn_bias"] + (b3 - post["running_mean"]) * t
    kernel, bias = fuse_qa_branches(w3, bn3, w1 if has_1x1 else None, groups if has_id else None, post)
    assert kernel.dtype == bias.dtype == torch.float64
    torch.testing.assert_close(kernel, ref_k, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(bias, ref_b, rtol=1e-14, atol=1e-14)
    # float32 in, float32 out (rounded once), and the weights themselves are never written
    w3_32 = w3.float()
    before = w3_32.clone()
    k32, b32 = fuse_qa_branches(w3_32, bn3, w1.float() if has_1x1 else None, groups if has_id else None, post)
    assert k32.dtype == b32.dtype == torch.float32 and torch.equal(w3_32, before)


def test_fuse_qa_branches_refuses_identity_with_different_channels():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="C_in == C_out"):
        fuse_qa_branches(torch.randn(6, 4, 3, 3), _bn(6, gen), None, 1, _bn(6, gen))
    with pytest.raises(ValueError, match="channels"):  # a post BN of the wrong width
        fuse_qa_branches(torch.randn(6, 4, 3, 3), _bn(6, gen), None, None, _bn(5, gen))


def test_branches_without_bn_are_summed_without_touching_the_weights():
    """A branch with ``bn=None`` is a plain conv (bias optional); a float64 main kernel is copied, never added into."""
    k3, k1 = torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.randn(4, 4, 1, 1, dtype=torch.float64)
    b3 = torch.randn(4, dtype=torch.float64)
    before = k3.clone()
    kernel, bias = fuse_branches([(k3, b3, None), (k1, None, None)])
    assert torch.equal(k3, before)
    expect = k3.clone()
    expect[:, :, 1, 1] += k1[:, :, 0, 0]
    assert torch.equal(kernel, expect) and torch.equal(bias, b3)


# ------------------------------------------------------------------------------------------------ the block
@st.composite
def block_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = in_ch if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    return {
        "in_ch": in_ch, "out_ch": out_ch, "stride": draw(st.sampled_from([1, 2])), "groups": groups,
        "dilation": draw(st.sampled_from([1, 2])), "use_1x1": draw(st.booleans()),
        "use_identity": draw(st.booleans()), "se_ratio": draw(st.sampled_from([0.0, 0.5])),
        "size": draw(st.integers(3, 9)), "seed": draw(st.integers(0, 2**16)),
    }


def _args(cfg: dict) -> tuple[tuple, dict]:
    return ((cfg["in_ch"], cfg["out_ch"], cfg["stride"], cfg["groups"], cfg["dilation"]),
            {k: cfg[k] for k in ("use_1x1", "use_identity", "se_ratio")})


def _make_block(cfg: dict, dtype: torch.dtype) -> QARepVGGBlock:
    torch.manual_seed(cfg["seed"])
    args, kw = _args(cfg)
    return randomize_batchnorm(QARepVGGBlock(*args, **kw).to(dtype), seed=cfg["seed"]).eval()


@settings(max_examples=20, deadline=None)
@given(cfg=block_configs(), double=st.booleans())
def test_block_equivalence_structure_and_idempotence(cfg, double):
    dtype = torch.float64 if double else torch.float32
    block = _make_block(cfg, dtype)
    has_id = cfg["use_identity"] and cfg["in_ch"] == cfg["out_ch"] and cfg["stride"] == 1
    assert (block.branch_identity is not None) == has_id and (block.branch_1x1 is not None) == cfg["use_1x1"]
    assert isinstance(block.post_bn, nn.BatchNorm2d) and isinstance(block.se, SEBlock) == (cfg["se_ratio"] > 0)
    x = torch.randn(2, cfg["in_ch"], cfg["size"], cfg["size"], dtype=dtype)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert out.dtype == dtype
    assert compare_outputs(out, ref)[1] <= TOL[dtype], cfg
    assert not [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in ("branch_3x3", "branch_1x1", "branch_identity", "post_bn"):
        assert not hasattr(block, name)
    conv = block.reparam
    assert conv.kernel_size == (3, 3) and conv.groups == cfg["groups"] and conv.padding == (cfg["dilation"],) * 2
    state = copy.deepcopy(block.state_dict())
    block.reparameterize()  # idempotent
    assert block.reparam is conv and all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    # the deploy form built directly has the same keys, shapes and dtype as RepVGG's; loads the fused weights strictly
    args, kw = _args(cfg)
    deployed = QARepVGGBlock(*args, **kw, deploy=True).to(dtype).eval()
    plain = RepVGGBlock(*args, **kw, deploy=True)
    assert {k: v.shape for k, v in deployed.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert deployed.state_dict().keys() == plain.state_dict().keys()
    deployed.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(deployed(x), out)


def test_training_form_is_the_documented_expression():
    """``ReLU(SE(BN_post(BN3(conv3x3 x) + conv1x1 x + x)))`` with plain modules; the 1x1 has no BN and no bias."""
    block = randomize_batchnorm(QARepVGGBlock(4, 4, se_ratio=0.5).double(), seed=3).eval()
    assert isinstance(block.branch_3x3, ConvBN) and type(block.branch_1x1) is nn.Conv2d
    assert block.branch_1x1.bias is None and isinstance(block.branch_identity, nn.Identity)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    b3, se = block.branch_3x3, block.se
    with torch.no_grad():
        s = block.post_bn(b3.bn(b3.conv(x)) + block.branch_1x1(x) + x)
        gate = torch.sigmoid(se.up(torch.relu(se.down(s.mean((2, 3), keepdim=True)))))
        assert compare_outputs(block(x), torch.relu(s * gate))[1] <= 1e-14
    assert QARepVGGBlock(8, 8, stride=2).branch_identity is None and QARepVGGBlock(8, 6).branch_identity is None
    assert QARepVGGBlock(8, 8, use_identity=False).branch_identity is None
    with pytest.raises(ValueError, match="groups"):
        QARepVGGBlock(6, 8, groups=4)


@pytest.mark.parametrize("wrong", ["post_eps", "no_identity", "no_post_shift"])
def test_a_wrong_fusion_fails_verification(wrong):
    """The checker sees a post-BN eps off by 1e-3, a dropped identity, or a post-BN mean left out of the bias."""
    block = randomize_batchnorm(QARepVGGBlock(8, 8, groups=2), seed=5).eval()
    right = copy.deepcopy(block)
    right.reparameterize()
    assert verify_equivalence(block, right, (2, 8, 7, 7)).passed
    post = bn_tensors(block.post_bn)
    if wrong == "post_eps":
        post["eps"] += 1e-3
    if wrong == "no_post_shift":
        post["running_mean"] = torch.zeros_like(post["running_mean"])
    identity = None if wrong == "no_identity" else 2
    kernel, bias = fuse_qa_branches(block.branch_3x3.conv.weight, bn_tensors(block.branch_3x3.bn),
                                    block.branch_1x1.weight, identity, post)
    bad = QARepVGGBlock(8, 8, groups=2, deploy=True)
    bad.load_state_dict({"reparam.weight": kernel, "reparam.bias": bias})
    result = verify_equivalence(block, bad, (2, 8, 7, 7))
    assert not result.passed and result.max_rel > 1e-4, result


# ------------------------------------------------------------------------------------------------ the zoo
def test_builders_are_importable_documented_and_registered():
    from repvgg_tools.models import qarepvgg_a0, repvgg_a0  # noqa: F401  (the import itself is the test)

    assert set(list_models("qarepvgg_*")) == set(QA_NAMES)
    names = list_models("repvgg_*") + list_models("qarepvgg_*")
    assert set(names) == set(zoo.REPVGG_CONFIGS) | set(zoo.QAREPVGG_CONFIGS)
    for name in names:
        builder = getattr(zoo, name)
        assert name in zoo.__all__ and builder.__name__ == name and builder.__doc__
        assert builder.__annotations__["return"] in ("RepVGG", zoo.RepVGG)
    with torch.device("meta"):
        model = qarepvgg_a0(num_classes=7)
    assert isinstance(model, zoo.RepVGG) and model.head.fc.out_features == 7
    for name in list_models():  # every registered model, VGG included, is an importable, documented function
        builder = getattr(zoo, name)
        assert name in zoo.__all__ and builder.__name__ == name and builder.__doc__
    assert all(isinstance(b, QARepVGGBlock) for b in _blocks(model))


@pytest.mark.parametrize("name", QA_NAMES)
def test_qa_model_fp32_equivalence_and_architecture(name):
    """Randomized BN, deploy vs training <= 1e-5 on every QA model; the RepVGG twin's architecture; a plain deploy
    graph with exactly the keys of ``deploy=True`` and of the RepVGG deploy form."""
    twin = name[2:]
    with torch.device("meta"):
        ref_arch = create_model(twin, num_classes=10)
        built = create_model(name, num_classes=10, deploy=True)
        twin_deploy = create_model(twin, num_classes=10, deploy=True)
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name, num_classes=10), seed=1).eval()
    for qa, rep in zip(_blocks(model), _blocks(ref_arch), strict=True):
        c, r = qa.branch_3x3.conv, rep.branch_3x3.conv
        assert (c.in_channels, c.out_channels, c.stride, c.groups) == (r.in_channels, r.out_channels, r.stride,
                                                                       r.groups)
        assert (qa.branch_identity is None) == (rep.branch_identity is None)
    x = torch.randn(*INPUT)
    with torch.no_grad():
        ref = model(x)
        deploy = reparameterize(model, inplace=True)
        out = deploy(x)
    assert compare_outputs(out, ref)[1] <= TOL[torch.float32]
    assert not [m for m in deploy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    body = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert body == [b.reparam for b in _blocks(deploy)] and all(c.kernel_size == (3, 3) for c in body)
    state = deploy.state_dict()
    assert state.keys() == twin_deploy.state_dict().keys()
    built.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), out)


@pytest.mark.parametrize("use_1x1", [True, False])
def test_conv_bn_folding_alone_leaves_the_post_sum_bn(use_1x1):
    """``fold_conv_bn`` on an un-fused QA model folds only real Conv2d->BN pairs (each 3x3 branch), never the
    post-sum BN (fed by a sum, or, without 1x1 and identity, by the 3x3 branch's BN): the function is unchanged."""
    model = randomize_batchnorm(create_model("qarepvgg_a0", num_classes=10, use_1x1=use_1x1).double(), seed=4).eval()
    x = torch.randn(*INPUT, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        folded = fold_conv_bn(model)
        out = model(x)
    blocks = _blocks(model)
    assert folded == len(blocks)
    assert all(type(b.post_bn) is nn.BatchNorm2d and isinstance(b.branch_3x3.bn, nn.Identity) for b in blocks)
    assert compare_outputs(out, ref)[1] <= TOL[torch.float64]


def test_features_only_qa_backbone():
    """What downstream models build on (``detection.feature_backbone``): output stride 16 dilates the last stage."""
    model = create_model("qarepvgg_a0", features_only=True, out_indices=(1, 2, 3, 4), output_stride=16,
                         frozen_stages=1, norm_eval=True)
    model = randomize_batchnorm(model, seed=6).train()
    assert all(isinstance(b, QARepVGGBlock) for b in _blocks(model)) and not hasattr(model, "head")
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # norm_eval
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        deploy = reparameterize(model)
        out = deploy(x)
    assert [f.shape[1] for f in out] == model.feature_info.channels()
    assert [32 // f.shape[-1] for f in out] == model.feature_info.reduction() == [4, 8, 16, 16]
    for o, r in zip(out, ref, strict=True):
        assert compare_outputs(o, r)[1] <= TOL[torch.float32]


# ------------------------------------------------------------------------------------------------ training L2
def test_custom_l2_gradient_on_a_qa_block():
    """The L2 of the fused kernel (post-sum BN included): autograd in float64 and a central finite difference."""
    block = randomize_batchnorm(QARepVGGBlock(4, 4, groups=2), seed=3)
    loss = custom_l2(block)
    loss.backward()
    leaves = {n: p.detach().double().requires_grad_() for n, p in block.named_parameters()}

    def fused(w3, g3, w1, g_post):
        t3 = g3 / (block.branch_3x3.bn.running_var.double() + block.branch_3x3.bn.eps).sqrt()
        k = w3 * t3.view(-1, 1, 1, 1)
        k = k + nn.functional.pad(w1, [1, 1, 1, 1])
        eye = torch.zeros_like(k)
        for i in range(4):
            eye[i, i % 2, 1, 1] = 1.0
        t = g_post / (block.post_bn.running_var.double() + block.post_bn.eps).sqrt()
        return (k + eye) * t.view(-1, 1, 1, 1)

    names = ("branch_3x3.conv.weight", "branch_3x3.bn.weight", "branch_1x1.weight", "post_bn.weight")
    ref = fused(*(leaves[n] for n in names)).pow(2).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    params = dict(block.named_parameters())
    for n in names:
        torch.testing.assert_close(params[n].grad.double(), leaves[n].grad, rtol=1e-5, atol=1e-7)
    block64 = block.double()
    for n, idx in (("branch_1x1.weight", (1, 0, 0, 0)), ("post_bn.weight", (2,))):
        w, h = dict(block64.named_parameters())[n], 1e-6
        with torch.no_grad():
            w[idx] += h
            up = block64.kernel_bias()[0].pow(2).sum()
            w[idx] -= 2 * h
            down = block64.kernel_bias()[0].pow(2).sum()
            w[idx] += h
        assert ((up - down) / (2 * h)).item() == pytest.approx(leaves[n].grad[idx].item(), rel=1e-5)


def test_param_groups_hand_qa_kernels_to_the_custom_l2():
    with torch.device("meta"):
        model = create_model("qarepvgg_a0", num_classes=10)
    by_id = {id(p): n for n, p in model.named_parameters()}
    custom = param_groups(model, 1e-4, custom_l2_enabled=True)
    decayed = {by_id[id(p)] for g in custom if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"head.fc.weight"}
    plain = param_groups(model, 1e-4)
    decayed = {by_id[id(p)] for g in plain if g["weight_decay"] > 0 for p in g["params"]}
    assert {"stem.branch_1x1.weight", "stem.branch_3x3.conv.weight"} <= decayed
    assert not any("bn" in n for n in decayed)


# ------------------------------------------------------------------------------------------------ export
def test_deploy_qa_model_exports_to_a_plain_onnx_graph():
    import onnx  # noqa: F401
    import onnxruntime as ort

    from repvgg_tools.export.onnx import export_onnx, op_counts

    model = randomize_batchnorm(create_model("qarepvgg_a0", num_classes=10), seed=7).eval()
    deploy = reparameterize(model)
    proto = export_onnx(deploy, 32)
    ops = op_counts(proto)
    assert set(ops) <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}, ops
    assert ops["Conv"] == ops["Relu"] == 22
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert compare_outputs(torch.from_numpy(got), model(x))[1] <= TOL[torch.float32]
