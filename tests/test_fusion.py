"""Tests of the pure tensor math in ``repvgg_tools.fusion.core``, against independent float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_helpers import bn_eval, random_bn
from torch import nn

from repvgg_tools.blocks import RepVGGBlock
from repvgg_tools.fusion import core as fusion
from repvgg_tools.verify import compare_outputs, randomize_batchnorm

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return compare_outputs(a, b)[1]


def _conv_bn(in_ch: int, out_ch: int, k: int, *, conv_bias: bool, affine: bool, groups: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, groups=groups, bias=conv_bias)
    if conv_bias:
        nn.init.normal_(conv.bias)
    bn = nn.BatchNorm2d(out_ch, affine=affine)
    randomize_batchnorm(bn, seed=seed)
    return conv, bn


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype=None):
    return fusion.fuse_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                               dtype=dtype)


def _reference_fold(w, b, mean, var, eps, gamma, beta):
    """Independent float64 fold, written from the formula (not from the library)."""
    w, mean, var = w.double(), mean.double(), var.double()
    gamma = gamma.double() if gamma is not None else torch.ones_like(mean)
    beta = beta.double() if beta is not None else torch.zeros_like(mean)
    b = b.double() if b is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + eps)
    return w * scale[:, None, None, None], beta + (b - mean) * scale


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "non_affine"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_fuse_conv_bn_matches_eval_conv_then_bn(conv_bias, affine, dtype, tol):
    conv, bn = _conv_bn(6, 8, 3, conv_bias=conv_bias, affine=affine)
    conv, bn = conv.to(dtype), bn.to(dtype).eval()
    x = torch.randn(2, 6, 7, 7, dtype=dtype)
    kernel, bias = _fuse(conv, bn)
    assert kernel.dtype == dtype and bias.dtype == dtype
    assert kernel.shape == conv.weight.shape and bias.shape == (8,)
    with torch.no_grad():
        ref = bn(conv(x))
        out = F.conv2d(x, kernel, bias, padding=1)
    assert _rel(out, ref) <= tol


def test_fuse_conv_bn_grouped_kernel():
    conv, bn = _conv_bn(8, 12, 3, conv_bias=False, affine=True, groups=4)
    conv, bn = conv.double(), bn.double().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    kernel, bias = _fuse(conv, bn)
    with torch.no_grad():
        assert _rel(F.conv2d(x, kernel, bias, padding=1, groups=4), bn(conv(x))) <= 1e-12


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
def test_fuse_conv_bn_returns_weight_dtype_computed_in_float64(dtype):
    conv, bn = _conv_bn(32, 64, 3, conv_bias=True, affine=True, seed=3)
    conv, bn = conv.to(dtype), bn.to(dtype)
    kernel, bias = _fuse(conv, bn)
    assert kernel.dtype == dtype and bias.dtype == dtype
    ref_k, ref_b = _reference_fold(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    if dtype == torch.float64:
        assert _rel(kernel, ref_k) <= 1e-14 and _rel(bias, ref_b) <= 1e-14
        return
    # computed in float64 and rounded once: equal to the rounded reference (a 1-ulp tie-break at most)
    ulp = torch.finfo(dtype).eps
    for got, ref in ((kernel, ref_k), (bias, ref_b)):
        rounded = ref.to(dtype)
        assert (got == rounded).float().mean() >= 0.999
        assert ((got.double() - rounded.double()).abs() <= ulp * rounded.double().abs()).all()
    # the check above is discriminating: arithmetic in the low precision itself rounds several times
    with torch.no_grad():
        naive = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    assert (naive != ref_k.to(dtype)).any()


def test_fuse_conv_bn_explicit_dtype_keeps_float64():
    conv, bn = _conv_bn(4, 4, 3, conv_bias=False, affine=True)
    kernel, bias = _fuse(conv.half(), bn.half(), dtype=torch.float64)
    assert kernel.dtype == torch.float64 and bias.dtype == torch.float64


@pytest.mark.parametrize("bad_var", [-1.0, -(2.0 ** -16), float("nan")], ids=["negative", "minus_eps", "nan"])
def test_fuse_rejects_nonpositive_variance(bad_var):
    conv, bn = _conv_bn(3, 4, 3, conv_bias=False, affine=True)
    bn.eps = 2.0 ** -16  # exactly representable, so var + eps is exactly 0 for "minus_eps"
    bn.running_var[2] = bad_var
    with pytest.raises(ValueError, match="running_var"):
        _fuse(conv, bn)
    with pytest.raises(ValueError):
        fusion.fuse_bn(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def test_fuse_rejects_channel_mismatch():
    conv, _ = _conv_bn(3, 4, 3, conv_bias=False, affine=True)
    bn = nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match="channels"):
        _fuse(conv, bn)


def test_fuse_bn_is_the_eval_batchnorm_affine_map():
    bn = randomize_batchnorm(nn.BatchNorm2d(5).double(), seed=7).eval()
    scale, shift = fusion.fuse_bn(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(x * scale[:, None, None] + shift[:, None, None], bn(x)) <= 1e-14


@pytest.mark.parametrize("target", [3, 5])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_pad_kernel_1x1_is_the_centre_tap(target, stride, dilation):
    k1 = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    padded = fusion.pad_kernel(k1, target)
    assert padded.shape == (6, 4, target, target) and padded.dtype == k1.dtype
    assert torch.equal(padded[:, :, target // 2, target // 2], k1[:, :, 0, 0])
    assert padded.abs().sum() == k1.abs().sum()
    x = torch.randn(2, 4, 11, 11, dtype=torch.float64)
    ref = F.conv2d(x, k1, stride=stride)  # padding p - d*(k//2) = 0
    out = F.conv2d(x, padded, stride=stride, padding=dilation * (target // 2), dilation=dilation)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-14


def test_pad_kernel_rectangular_and_noop():
    k = torch.randn(2, 2, 1, 3)
    assert fusion.pad_kernel(k, (3, 3)).shape == (2, 2, 3, 3)
    assert torch.equal(fusion.pad_kernel(k, (1, 3)), k)


@pytest.mark.parametrize("shape,size", [((2, 2, 3, 3), 1), ((2, 2, 1, 1), 4), ((2, 2, 2, 2), 4), ((2, 2, 2, 2), 3),
                                        ((2, 2, 5, 5), (3, 5))])
def test_pad_kernel_rejects_bad_sizes(shape, size):
    with pytest.raises(ValueError):
        fusion.pad_kernel(torch.zeros(shape), size)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_identity_kernel_reproduces_input_exactly(k, groups, dtype):
    channels = 8
    kernel = fusion.identity_kernel(channels, k, groups, dtype=dtype)
    assert kernel.shape == (channels, channels // groups, k, k) and kernel.dtype == dtype
    assert kernel.sum().item() == channels and set(kernel.unique().tolist()) <= {0.0, 1.0}
    x = torch.randn(2, channels, 6, 7).to(dtype)
    out = F.conv2d(x, kernel, padding=k // 2, groups=groups)
    assert torch.equal(out, x)


def test_identity_kernel_dilated_and_rejects_bad_arguments():
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    kernel = fusion.identity_kernel(6, 3, 3, dtype=torch.float64)
    assert torch.equal(F.conv2d(x, kernel, padding=2, dilation=2, groups=3), x)
    with pytest.raises(ValueError):
        fusion.identity_kernel(6, 3, groups=4)
    with pytest.raises(ValueError):
        fusion.identity_kernel(6, 2)


def test_merge_branches_sums_in_float64_and_rounds_once():
    torch.manual_seed(1)
    ks = [torch.randn(8, 4, 3, 3, dtype=torch.float64) * s for s in (1.0, 1e-3, 1e3)]
    bs = [torch.randn(8, dtype=torch.float64) for _ in ks]
    kernel, bias = fusion.merge_branches([k.half() for k in ks], [b.half() for b in bs])
    assert kernel.dtype == torch.float16 and bias.dtype == torch.float16
    ref_k = sum(k.half().double() for k in ks)
    ref_b = sum(b.half().double() for b in bs)
    assert torch.equal(kernel, ref_k.half()) and torch.equal(bias, ref_b.half())
    k64, b64 = fusion.merge_branches([k.half() for k in ks], [b.half() for b in bs], dtype=torch.float64)
    assert torch.equal(k64, ref_k) and torch.equal(b64, ref_b)


def test_merge_branches_equals_sum_of_convolutions():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    k3, k1 = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, 4, 1, 1, dtype=torch.float64)
    b3, b1 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    k1_padded = fusion.pad_kernel(k1, 3)
    inputs = [k3, k1_padded, b3, b1, k1]
    before = [t.clone() for t in inputs]
    ref = F.conv2d(x, k3, b3, padding=1) + F.conv2d(x, k1, b1)
    kernel, bias = fusion.merge_branches([k3, k1_padded], [b3, b1])
    assert _rel(F.conv2d(x, kernel, bias, padding=1), ref) <= 1e-14
    # the inputs are not modified (an in-place sum into the first kernel would pass the check above)
    for name, t, b in zip(("k3", "k1_padded", "b3", "b1", "k1"), inputs, before, strict=True):
        assert torch.equal(t, b), f"merge_branches modified its input {name}"
    # and the result does not alias an input
    assert all(out.data_ptr() != t.data_ptr() for out in (kernel, bias) for t in inputs)


def test_merge_branches_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        fusion.merge_branches([], [])
    with pytest.raises(ValueError):
        fusion.merge_branches([torch.zeros(1, 1, 3, 3)], [])


def test_gradients_flow_through_block_kernel_bias():
    """The paper's custom L2 penalizes the fused kernel: its gradient must reach every branch parameter."""
    block = randomize_batchnorm(RepVGGBlock(4, 4, groups=2).double(), seed=5)
    names = [n for n, p in block.named_parameters()]
    assert {"branch_3x3.conv.weight", "branch_1x1.conv.weight", "branch_identity.weight"} <= set(names)

    class Fused(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self):
            return self.inner.kernel_bias()

    wrapper = Fused(block)
    params = {f"inner.{n}": p.detach().clone().requires_grad_(True) for n, p in block.named_parameters()}

    def fn(*values):
        return torch.func.functional_call(wrapper, dict(zip(params, values, strict=True)), ())

    assert torch.autograd.gradcheck(fn, tuple(params.values()))
    # and with the module's own parameters: a custom L2 on the fused kernel gives every parameter a gradient
    kernel, bias = block.kernel_bias()
    ((kernel ** 2).sum() + (bias ** 2).sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kernel_bias_dtype_argument():
    block = randomize_batchnorm(RepVGGBlock(4, 8), seed=2)
    kernel, bias = block.kernel_bias(torch.float64)
    assert kernel.dtype == torch.float64 and kernel.shape == (8, 4, 3, 3) and bias.shape == (8,)
    k32, b32 = block.kernel_bias()
    assert k32.dtype == torch.float32 and torch.equal(k32, kernel.float()) and torch.equal(b32, bias.float())


@pytest.mark.parametrize("groups", [1, 2])
def test_fuse_branches_equals_the_branch_sum_for_mixed_kernel_sizes(groups):
    """5x5 + 3x3 (with conv bias) + 1x1 + a 1x1 identity, all folded into one 5x5 conv, in float64."""
    gen = torch.Generator().manual_seed(3)
    c = 4
    x = torch.randn(2, c, 9, 9, generator=gen, dtype=torch.float64)
    k5 = torch.randn(c, c // groups, 5, 5, generator=gen, dtype=torch.float64)
    k3 = torch.randn(c, c // groups, 3, 3, generator=gen, dtype=torch.float64)
    b3 = torch.randn(c, generator=gen, dtype=torch.float64)
    k1 = torch.randn(c, c // groups, 1, 1, generator=gen, dtype=torch.float64)
    bns = [random_bn(c, gen) for _ in range(4)]
    eye = fusion.identity_kernel(c, 1, groups, torch.float64)
    ref = (bn_eval(F.conv2d(x, k5, padding=2, groups=groups), bns[0])
           + bn_eval(F.conv2d(x, k3, b3, padding=1, groups=groups), bns[1])
           + bn_eval(F.conv2d(x, k1, groups=groups), bns[2])
           + bn_eval(x, bns[3]))
    kernel, bias = fusion.fuse_branches([(k3, b3, bns[1]), (k5, None, bns[0]), (k1, None, bns[2]),
                                         (eye, None, bns[3])])
    assert kernel.shape == (c, c // groups, 5, 5)
    out = F.conv2d(x, kernel, bias, padding=2, groups=groups)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-12


def test_fuse_branches_rounds_once_and_rejects_even_kernels():
    gen = torch.Generator().manual_seed(4)
    k3 = torch.randn(4, 4, 3, 3, generator=gen).half()
    k1 = torch.randn(4, 4, 1, 1, generator=gen).half()
    bn3, bn1 = random_bn(4, gen), random_bn(4, gen)
    kernel, bias = fusion.fuse_branches([(k3, None, bn3), (k1, None, bn1)])
    assert kernel.dtype == bias.dtype == torch.float16
    exact, exact_b = fusion.fuse_branches([(k3.double(), None, bn3), (k1.double(), None, bn1)])
    assert torch.equal(kernel, exact.half()) and torch.equal(bias, exact_b.half())
    with pytest.raises(ValueError, match="odd"):
        fusion.fuse_branches([(k3, None, bn3), (torch.randn(4, 4, 2, 2).half(), None, bn1)])
    with pytest.raises(ValueError):
        fusion.fuse_branches([])
