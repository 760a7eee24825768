"""Property tests of ``RepVGGBlock``: the training form and its single-conv deploy form compute the same function."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repvgg_tools.blocks import ConvBN, RepVGGBlock, SEBlock
from repvgg_tools.verify import compare_outputs, randomize_batchnorm

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@st.composite
def block_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    same = draw(st.booleans())  # half the cases have in == out, where an identity branch can exist
    out_ch = in_ch if same else groups * draw(st.integers(1, 3))
    return {
        "in_ch": in_ch,
        "out_ch": out_ch,
        "stride": draw(st.sampled_from([1, 2])),
        "groups": groups,
        "dilation": draw(st.sampled_from([1, 2])),
        "use_1x1": draw(st.booleans()),
        "use_identity": draw(st.booleans()),
        "se_ratio": draw(st.sampled_from([0.0, 0.5])),
        "size": draw(st.integers(3, 9)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _make_block(cfg: dict, dtype: torch.dtype) -> RepVGGBlock:
    torch.manual_seed(cfg["seed"])
    kw = {k: cfg[k] for k in ("use_1x1", "use_identity", "se_ratio")}
    block = RepVGGBlock(cfg["in_ch"], cfg["out_ch"], cfg["stride"], cfg["groups"], cfg["dilation"], **kw)
    return randomize_batchnorm(block.to(dtype), seed=cfg["seed"]).eval()


def _check_equivalence(cfg: dict, dtype: torch.dtype) -> None:
    block = _make_block(cfg, dtype)
    expect_identity = cfg["use_identity"] and cfg["in_ch"] == cfg["out_ch"] and cfg["stride"] == 1
    assert (block.branch_identity is not None) == expect_identity
    assert (block.branch_1x1 is not None) == cfg["use_1x1"]
    x = torch.randn(2, cfg["in_ch"], cfg["size"], cfg["size"], dtype=dtype)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert out.shape == ref.shape and out.dtype == dtype
    _, rel = compare_outputs(out, ref)
    assert rel <= TOL[dtype], (cfg, rel)


@settings(max_examples=40, deadline=None)
@given(cfg=block_configs())
def test_block_equivalence_fp32(cfg):
    _check_equivalence(cfg, torch.float32)


@settings(max_examples=25, deadline=None)
@given(cfg=block_configs())
def test_block_equivalence_fp64(cfg):
    _check_equivalence(cfg, torch.float64)


def _convs_and_bns(module: nn.Module):
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return convs, bns


@settings(max_examples=15, deadline=None)
@given(cfg=block_configs())
def test_reparameterize_structure_idempotent_and_matches_deploy_form(cfg):
    block = _make_block(cfg, torch.float32)
    block.reparameterize()
    convs, bns = _convs_and_bns(block)
    assert not bns
    body = [c for c in convs if not isinstance(block.se, SEBlock) or all(c is not s for s in block.se.modules())]
    assert body == [block.reparam]
    conv = block.reparam
    assert conv.kernel_size == (3, 3) and conv.bias is not None
    assert conv.stride == (cfg["stride"],) * 2 and conv.dilation == (cfg["dilation"],) * 2
    assert conv.padding == (cfg["dilation"],) * 2 and conv.groups == cfg["groups"]
    for name in ("branch_3x3", "branch_1x1", "branch_identity"):
        assert not hasattr(block, name)
    # idempotent: a second call changes nothing
    state = copy.deepcopy(block.state_dict())
    block.reparameterize()
    assert block.reparam is conv
    after = block.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    # a block built with deploy=True has the same state_dict keys and shapes, and loads the fused weights strictly
    kw = {k: cfg[k] for k in ("use_1x1", "use_identity", "se_ratio")}
    deployed = RepVGGBlock(cfg["in_ch"], cfg["out_ch"], cfg["stride"], cfg["groups"], cfg["dilation"], deploy=True,
                           **kw).eval()
    assert {k: v.shape for k, v in deployed.state_dict().items()} == {k: v.shape for k, v in after.items()}
    deployed.load_state_dict(after, strict=True)
    x = torch.randn(1, cfg["in_ch"], cfg["size"], cfg["size"])
    with torch.no_grad():
        assert torch.equal(deployed(x), block(x))


def test_branches_follow_the_switches():
    assert RepVGGBlock(8, 8).branch_identity is not None
    assert RepVGGBlock(8, 8, stride=2).branch_identity is None
    assert RepVGGBlock(8, 16).branch_identity is None
    assert RepVGGBlock(8, 8, use_identity=False).branch_identity is None
    assert RepVGGBlock(8, 8, use_1x1=False).branch_1x1 is None
    se = RepVGGBlock(32, 32, se_ratio=1 / 16).se
    assert isinstance(se, SEBlock) and se.down.out_channels == 2 and se.up.out_channels == 32
    assert isinstance(RepVGGBlock(8, 8).se, nn.Identity)
    assert isinstance(RepVGGBlock(8, 8).branch_3x3, ConvBN)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups"):
        RepVGGBlock(6, 8, groups=4)


def test_training_form_is_the_documented_sum():
    """``ReLU(SE(BN(conv3x3 x) + BN(conv1x1 x) + BN(x)))``, written out with plain modules."""
    block = randomize_batchnorm(RepVGGBlock(4, 4, se_ratio=0.5).double(), seed=3).eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    b3, b1, bid, se = block.branch_3x3, block.branch_1x1, block.branch_identity, block.se
    with torch.no_grad():
        s = b3.bn(b3.conv(x)) + b1.bn(b1.conv(x)) + bid(x)
        gate = torch.sigmoid(se.up(torch.relu(se.down(s.mean((2, 3), keepdim=True)))))
        ref = torch.relu(s * gate)
        assert compare_outputs(block(x), ref)[1] <= 1e-14


def test_kernel_bias_of_deployed_block_is_its_conv():
    block = randomize_batchnorm(RepVGGBlock(4, 6), seed=1).eval()
    kernel, bias = block.kernel_bias()
    block.reparameterize()
    k2, b2 = block.kernel_bias()
    assert k2 is block.reparam.weight and b2 is block.reparam.bias
    assert torch.equal(kernel.detach(), k2.detach()) and torch.equal(bias.detach(), b2.detach())


def test_reparameterize_keeps_dtype_and_requires_grad():
    block = randomize_batchnorm(RepVGGBlock(4, 4).double(), seed=0).eval()
    block.reparameterize()
    assert block.reparam.weight.dtype == torch.float64 and block.reparam.bias.dtype == torch.float64
    assert block.reparam.weight.requires_grad  # the deploy model can be fine-tuned
