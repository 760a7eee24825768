"""Quantization-aware training of the deploy form: fuse first, then fake-quantize, with scales from PTQ calibration.

Reparameterized networks are fine-tuned for int8 *after* fusion: the fused 3x3 kernel is what gets quantized, and
fake-quantizing the branches separately would train a different quantization than the one deployed. Every Conv2d
and Linear gets TensorRT's scheme (see :mod:`repvgg_tools.export.qdq`): its input fake-quantized per tensor
(symmetric int8, scale initialized from the largest |x| on calibration batches, then a moving average) and its
weight per output channel (symmetric, ``max|W| / 127``, tracked as the weights move). Observers run only in training
mode, so evaluation never changes a scale.

:func:`qat_state` splits a QAT model into a plain deploy state dict (what every loader reads) and the learned
scales; ``repvgg-export --precision int8`` writes those scales as Q/DQ without calibrating again
(:func:`repvgg_tools.export.int8.export_int8` with ``scales=``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["QAT_FORMAT", "QATConv2d", "QATLinear", "prepare_qat", "qat_state", "is_qat"]

log = logging.getLogger(__name__)

QAT_FORMAT = "repvgg-tools qat int8 v1"


def _act_fq() -> nn.Module:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                        qscheme=torch.per_tensor_symmetric)


def _weight_fq() -> nn.Module:
    from torch.ao.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver

    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, averaging_constant=1.0)


class _FakeQuantMixin:
    """Fake-quantizes the input (per tensor) and the weight (per output channel); observers only in training."""

    input_fq: nn.Module
    weight_fq: nn.Module

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        observe = int(self.training)
        for fq in (self.input_fq, self.weight_fq):
            fq.observer_enabled.fill_(observe)
        return self.input_fq(x), self.weight_fq(self.weight)


class QATConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with int8 fake quantization; parameters keep the names of the conv it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized(x)
        return self._conv_forward(x, w, self.bias)


class QATLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with int8 fake quantization; parameters keep the names of the layer it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quantized(x)
        return nn.functional.linear(x, w, self.bias)


def _swap(layer: nn.Module) -> nn.Module:
    cls = QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)  # same parameters and hyper-parameters, no copy
    new._modules = dict(layer._modules)
    new.input_fq, new.weight_fq = _act_fq(), _weight_fq()
    return new


def is_qat(model: nn.Module) -> bool:
    """Whether ``model`` has fake-quantized layers (:func:`prepare_qat`)."""
    return any(isinstance(m, (QATConv2d, QATLinear)) for m in model.modules())


@torch.no_grad()
def prepare_qat(model: nn.Module, calib_batches: Iterable[torch.Tensor]) -> nn.Module:
    """The deploy form of ``model`` (:func:`repvgg_tools.reparameterize`) with every Conv2d and Linear fake-quantized,
    activation scales initialized by PTQ calibration (largest |x| reaching each layer on ``calib_batches``).

    Raises:
        ValueError: no calibration batch, or a model without Conv2d/Linear layers.
    """
    from .. import reparameterize

    deploy = reparameterize(model).eval()
    layers = {name: m for name, m in deploy.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    amax = dict.fromkeys(layers, 0.0)

    def hook(name):
        def record(_module, inputs):
            amax[name] = max(amax[name], float(inputs[0].detach().abs().max()))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    device = next(deploy.parameters()).device
    seen = 0
    try:
        for x in calib_batches:
            deploy(x.to(device))
            seen += len(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("no calibration images for the QAT scales")
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = deploy.get_submodule(parent_name) if parent_name else deploy
        qat_layer = _swap(layer).to(device)
        observer = qat_layer.input_fq.activation_post_process
        bound = amax[name] if amax[name] > 0 else 1.0
        observer.min_val.resize_(()).fill_(-bound)
        observer.max_val.resize_(()).fill_(bound)
        scale, zero = observer.calculate_qparams()
        qat_layer.input_fq.scale.resize_(scale.shape).copy_(scale)
        qat_layer.input_fq.zero_point.resize_(zero.shape).copy_(zero)
        qat_layer.weight_fq(qat_layer.weight.detach())  # observe the weights once: per-channel scales
        setattr(parent, child, qat_layer)
    log.info("QAT: %d layers fake-quantized, activation scales from %d calibration images", len(layers), seen)
    return deploy.train(model.training)


def qat_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(plain deploy state dict, quant)`` of a QAT model; ``quant`` holds ``format``, ``activation_scales`` and
    ``weight_scales`` (float32 tensors keyed by layer name, e.g. ``stages.0.0.reparam``), the scales the fake
    quantization used."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    act, weight = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (QATConv2d, QATLinear)):
            act[name] = m.input_fq.scale.detach().float().reshape(()).cpu().clone()
            weight[name] = m.weight_fq.scale.detach().float().reshape(-1).cpu().clone()
    skip = (".input_fq.", ".weight_fq.")
    plain = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if not any(s in f".{k}" for s in skip)}
    return plain, {"format": QAT_FORMAT, "activation_scales": act, "weight_scales": weight}
