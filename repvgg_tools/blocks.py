"""Building blocks: conv+BN, squeeze-excitation, the RepVGG block and the QARepVGG block.

Blocks only gather tensors; the arithmetic of re-parameterization lives in :mod:`repvgg_tools.fusion.core`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fusion import core as fusion

__all__ = ["ConvBN", "SEBlock", "RepVGGBlock", "QARepVGGBlock", "bn_tensors", "conv_bn_kernel_bias"]


def bn_tensors(bn: nn.BatchNorm2d) -> dict:
    """The inference-mode tensors of a BatchNorm, as keyword arguments for :func:`fusion.fuse_conv_bn`."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm that does not track running statistics")
    return {
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "eps": bn.eps,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
    }


def conv_bn_kernel_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Fused ``(kernel, bias)`` of a Conv2d followed by a BatchNorm2d (see :func:`fusion.fuse_conv_bn`)."""
    return fusion.fuse_conv_bn(conv.weight, conv.bias, dtype=dtype, **bn_tensors(bn))


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d: one branch of a RepVGG block."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def kernel_bias(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Equivalent ``(kernel, bias)`` of this branch."""
        return conv_bn_kernel_bias(self.conv, self.bn, dtype)


class SEBlock(nn.Module):
    """Squeeze-excitation as in RepVGG-D2se: global pool, 1x1 conv down, ReLU, 1x1 conv up, sigmoid, rescale."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, reduced, 1, bias=True)
        self.up = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.up(torch.relu(self.down(s))))
        return x * s


class _BranchBlock(nn.Module):
    """What RepVGG and QARepVGG blocks share: a 3x3 conv+BN, an optional 1x1 and identity branch, an optional BN
    after the sum, SE and ReLU, and a deploy form that is one 3x3 conv (``reparam``). Subclasses build the side
    branches (:meth:`_side_branches`) and compute the fused ``(kernel, bias)`` (:meth:`kernel_bias`)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1, *,
        use_1x1: bool = True, use_identity: bool = True, se_ratio: float = 0.0, deploy: bool = False,
    ) -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"groups={groups} must divide in_ch={in_ch} and out_ch={out_ch}")
        self.in_ch, self.out_ch, self.stride, self.groups, self.dilation = in_ch, out_ch, stride, groups, dilation
        self.se = SEBlock(out_ch, max(1, int(out_ch * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.act = nn.ReLU()
        if deploy:
            self.reparam = nn.Conv2d(in_ch, out_ch, 3, stride, dilation, dilation, groups, bias=True)
            return
        self.branch_3x3 = ConvBN(in_ch, out_ch, 3, stride, dilation, dilation, groups)
        self._side_branches(use_1x1, use_identity and in_ch == out_ch and stride == 1)

    def _side_branches(self, use_1x1: bool, has_identity: bool) -> None:
        raise NotImplementedError

    @property
    def is_deployed(self) -> bool:
        return hasattr(self, "reparam")

    def forward(self, x: Tensor) -> Tensor:
        if self.is_deployed:
            return self.act(self.se(self.reparam(x)))
        out = self.branch_3x3(x)
        if self.branch_1x1 is not None:
            out = out + self.branch_1x1(x)
        if self.branch_identity is not None:
            out = out + self.branch_identity(x)
        post_bn = getattr(self, "post_bn", None)
        return self.act(self.se(out if post_bn is None else post_bn(out)))

    def kernel_bias(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches (and a BN after their sum) by one 3x3 conv with bias, in place. Calling it again
        does nothing."""
        if self.is_deployed:
            return
        kernel, bias = self.kernel_bias()
        reparam = _conv_from(self.branch_3x3.conv, kernel, bias)
        del self.branch_3x3, self.branch_1x1, self.branch_identity
        if hasattr(self, "post_bn"):
            del self.post_bn
        self.reparam = reparam


class RepVGGBlock(_BranchBlock):
    """``ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)))`` in training form; ``ReLU(SE(conv3x3(x)))`` deployed.

    The identity branch exists when ``in_ch == out_ch`` and ``stride == 1``. ``use_1x1``/``use_identity`` switch
    branches off (the paper's ablations). SE is optional and survives deployment.

    Args:
        in_ch, out_ch: channels.
        stride, dilation, groups: of the 3x3 convolution; every branch shares them.
        use_1x1, use_identity: keep the 1x1 and identity branches.
        se_ratio: SE reduction (``out_ch * se_ratio`` hidden channels); 0 disables SE.
        deploy: build the single-conv deploy form directly.
    """

    def _side_branches(self, use_1x1: bool, has_identity: bool) -> None:
        # padding p - d*(k//2) = 0 keeps the 1x1 output aligned with the 3x3 centre tap for any stride/dilation
        self.branch_1x1 = ConvBN(self.in_ch, self.out_ch, 1, self.stride, 0, 1, self.groups) if use_1x1 else None
        self.branch_identity = nn.BatchNorm2d(self.in_ch) if has_identity else None

    def kernel_bias(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Equivalent 3x3 ``(kernel, bias)`` of the block's branch sum; differentiable (used by the custom L2).

        Args:
            dtype: result dtype; defaults to the weights' dtype. Intermediates are float64 either way.
        """
        if self.is_deployed:
            return self.reparam.weight, self.reparam.bias
        weight = self.branch_3x3.conv.weight
        branches = [(weight, None, bn_tensors(self.branch_3x3.bn))]
        if self.branch_1x1 is not None:
            branches.append((self.branch_1x1.conv.weight, None, bn_tensors(self.branch_1x1.bn)))
        if self.branch_identity is not None:
            eye = fusion.identity_kernel(self.in_ch, 1, self.groups, weight.dtype, weight.device)  # centre tap
            branches.append((eye, None, bn_tensors(self.branch_identity)))
        return fusion.fuse_branches(branches, dtype or weight.dtype)


def _conv_from(conv: nn.Conv2d, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    """A Conv2d with ``conv``'s geometry holding the fused ``kernel`` and ``bias`` (the deploy conv of a block)."""
    # built on the meta device first, so no random initialization is computed and lost
    reparam = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=True, device="meta", dtype=kernel.dtype,
    )
    reparam.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
    reparam.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return reparam


class QARepVGGBlock(_BranchBlock):
    """QARepVGG (Chu et al., 2023, M1-M4): ``ReLU(SE(BN(BN_3(conv3x3(x)) + conv1x1(x) + x)))`` in training form,
    ``ReLU(SE(conv3x3(x)))`` deployed.

    Quantization-friendly RepVGG: the 1x1 branch has no BatchNorm and no bias, the identity branch no BatchNorm, and
    one BatchNorm (``post_bn``) follows the sum; the reference implementation's default block (``QARepVGGBlockV2``).
    The identity exists when ``in_ch == out_ch`` and ``stride == 1``. SE, when enabled, sits after ``post_bn`` so the
    block still fuses exactly (the reference puts it before the post-sum BN, which no single conv can express).
    Same arguments, deploy attribute (``reparam``) and idempotent :meth:`reparameterize` as :class:`RepVGGBlock`.
    """

    def _side_branches(self, use_1x1: bool, has_identity: bool) -> None:
        # padding p - d*(k//2) = 0 keeps the 1x1 output aligned with the 3x3 centre tap for any stride/dilation
        self.branch_1x1 = (nn.Conv2d(self.in_ch, self.out_ch, 1, self.stride, 0, 1, self.groups, bias=False)
                           if use_1x1 else None)
        self.branch_identity = nn.Identity() if has_identity else None
        self.post_bn = nn.BatchNorm2d(self.out_ch)

    def kernel_bias(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Equivalent 3x3 ``(kernel, bias)`` of ``post_bn(branch sum)`` (:func:`fusion.fuse_qa_branches`);
        differentiable (used by the training L2).

        Args:
            dtype: result dtype; defaults to the weights' dtype. Intermediates are float64 either way.
        """
        if self.is_deployed:
            return self.reparam.weight, self.reparam.bias
        weight = self.branch_3x3.conv.weight
        return fusion.fuse_qa_branches(
            weight, bn_tensors(self.branch_3x3.bn),
            self.branch_1x1.weight if self.branch_1x1 is not None else None,
            self.groups if self.branch_identity is not None else None,
            bn_tensors(self.post_bn), dtype or weight.dtype,
        )
