"""torchvision detection and segmentation models on RepVGG/VGG feature backbones.

Every builder puts the feature backbone (``create_model(arch, features_only=True, ...)``) under ``backbone.body``,
so a whole-model checkpoint holds the RepVGG tensors under the prefix ``backbone.body.`` and the heads untouched:

- :func:`repvgg_fasterrcnn`: Faster R-CNN, RepVGG + FPN (levels 1-4, strides 4-32, plus a max-pooled level).
- :func:`repvgg_retinanet`: RetinaNet, RepVGG + FPN (levels 2-4, strides 8-32, plus P6/P7).
- :func:`repvgg_deeplabv3`: DeepLabV3 (ASPP head) on the last level at output stride 8 or 16.

Train the multi-branch form, then ``reparameterize(model.eval())`` (or convert a saved checkpoint with
``repvgg-convert``) and load it into the same builder called with ``deploy=True``.
torchvision is imported by the builders, not by this module.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .contract import DETECTION_SCORE_TOL
from .models import create_model

__all__ = [
    "BACKBONE_PREFIX", "FPNBackbone", "NamedFeatures", "feature_backbone", "repvgg_fpn_backbone",
    "repvgg_fasterrcnn", "repvgg_retinanet", "repvgg_deeplabv3", "synthetic_shapes",
    "compare_detections",
]

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone.body."  # where the RepVGG tensors live in every model built here


class FPNBackbone(nn.Module):
    """A feature backbone (``body``) and a ``torchvision.ops.FeaturePyramidNetwork`` (``fpn``), like torchvision's
    ``BackboneWithFPN`` (same keys), for backbones that return a list of feature maps.

    Args:
        body: a ``features_only`` model (exposes ``feature_info``).
        out_channels: FPN channels.
        extra_blocks: torchvision ``ExtraFPNBlock`` (default: ``LastLevelMaxPool``, one more level).
        norm_layer: FPN normalization (default none).
    """

    def __init__(
        self, body: nn.Module, out_channels: int = 256, extra_blocks: nn.Module | None = None,
        norm_layer: Any = None,
    ) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels,
            extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(), norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class NamedFeatures(nn.Module):
    """Wrap a list-returning backbone (``body``) so it returns an ``OrderedDict`` with the given names."""

    def __init__(self, body: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        if len(names) != len(body.feature_info.out_indices):
            raise ValueError(f"{len(names)} names for {len(body.feature_info.out_indices)} feature maps")
        self.body = body
        self.names = tuple(names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict(zip(self.names, self.body(x), strict=True))


def feature_backbone(
    arch: str | nn.Module, out_indices: Sequence[int], *, deploy: bool = False, output_stride: int | None = None,
    frozen_stages: int = -1, norm_eval: bool = False, backbone_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A ``features_only`` backbone: built from a registered name, or ``arch`` itself when it is one already.

    Raises:
        ValueError: a module without ``feature_info``, or one whose ``out_indices`` differ from those requested.
    """
    if isinstance(arch, nn.Module):
        info = getattr(arch, "feature_info", None)
        if not getattr(arch, "features_only", False) or info is None:
            raise ValueError("arch must be a model name or a features_only backbone (with feature_info)")
        if tuple(info.out_indices) != tuple(out_indices):
            raise ValueError(f"the backbone returns levels {tuple(info.out_indices)}, this model needs "
                             f"{tuple(out_indices)}; build it with out_indices={tuple(out_indices)}")
        return arch
    return create_model(
        arch, deploy=deploy, features_only=True, out_indices=tuple(out_indices), output_stride=output_stride,
        frozen_stages=frozen_stages, norm_eval=norm_eval, **dict(backbone_kwargs or {}),
    )


def repvgg_fpn_backbone(
    arch: str | nn.Module, out_indices: Sequence[int] = (1, 2, 3, 4), fpn_channels: int = 256,
    extra_blocks: nn.Module | None = None, **backbone_options: Any,
) -> FPNBackbone:
    """RepVGG/VGG + FPN with keys ``body.*`` and ``fpn.*``; ``backbone_options`` go to :func:`feature_backbone`."""
    return FPNBackbone(feature_backbone(arch, out_indices, **backbone_options), fpn_channels, extra_blocks)


def _anchor_bases(anchor_sizes: Sequence[int] | None, levels: int) -> list[int]:
    bases = list(anchor_sizes) if anchor_sizes is not None else [32 * 2**i for i in range(levels)]
    if len(bases) != levels:
        raise ValueError(f"anchor_sizes needs one base size per pyramid level ({levels}), got {len(bases)}")
    return bases


def repvgg_fasterrcnn(
    arch: str | nn.Module, num_classes: int, *, out_indices: Sequence[int] = (1, 2, 3, 4), fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None, deploy: bool = False, frozen_stages: int = -1,
    norm_eval: bool = False, backbone_kwargs: Mapping[str, Any] | None = None, **kwargs: Any,
) -> nn.Module:
    """Faster R-CNN on a RepVGG/VGG + FPN backbone (torchvision ``FasterRCNN``).

    Args:
        arch: a registered name (e.g. ``"repvgg_a0"``) or a ``features_only`` backbone.
        num_classes: including the background class (ignored when ``box_predictor`` is given).
        out_indices: backbone levels fed to the FPN (default strides 4-32); the FPN adds a max-pooled level.
        fpn_channels: FPN width.
        anchor_sizes: one base anchor size per pyramid level (default 32, 64, ...); use small ones for small images.
        deploy: build the plain backbone (to load a converted checkpoint).
        frozen_stages, norm_eval: fine-tuning options of the backbone (see :mod:`repvgg_tools.models.features`).
        backbone_kwargs: more ``create_model`` options (``in_chans``, ``use_1x1``...).
        **kwargs: ``FasterRCNN`` options (``min_size``, ``max_size``, ``box_score_thresh``...).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = repvgg_fpn_backbone(
        arch, out_indices, fpn_channels, deploy=deploy, frozen_stages=frozen_stages, norm_eval=norm_eval,
        backbone_kwargs=backbone_kwargs,
    )
    levels = len(out_indices) + 1
    if "rpn_anchor_generator" not in kwargs:
        bases = _anchor_bases(anchor_sizes, levels)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((s,) for s in bases), ((0.5, 1.0, 2.0),) * levels)
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign([str(i) for i in range(len(out_indices))], 7, 2))
    # torchvision wants num_classes=None when the caller brings its own box predictor
    return FasterRCNN(backbone, num_classes=None if kwargs.get("box_predictor") is not None else num_classes, **kwargs)


def repvgg_retinanet(
    arch: str | nn.Module, num_classes: int, *, out_indices: Sequence[int] = (2, 3, 4), fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None, deploy: bool = False, frozen_stages: int = -1,
    norm_eval: bool = False, backbone_kwargs: Mapping[str, Any] | None = None, **kwargs: Any,
) -> nn.Module:
    """RetinaNet on a RepVGG/VGG + FPN backbone with P6/P7 (torchvision ``RetinaNet``); arguments as
    :func:`repvgg_fasterrcnn` (the FPN adds P6 and P7; target labels must be below ``num_classes``)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = feature_backbone(
        arch, out_indices, deploy=deploy, frozen_stages=frozen_stages, norm_eval=norm_eval,
        backbone_kwargs=backbone_kwargs,
    )
    backbone = FPNBackbone(body, fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
    levels = len(out_indices) + 2
    if "anchor_generator" not in kwargs:
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in _anchor_bases(anchor_sizes, levels))
        kwargs["anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    return RetinaNet(backbone, num_classes=num_classes, **kwargs)


def repvgg_deeplabv3(
    arch: str | nn.Module, num_classes: int, *, output_stride: int = 8, aux_loss: bool = False,
    deploy: bool = False, frozen_stages: int = -1, norm_eval: bool = False,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """DeepLabV3 (torchvision ``DeepLabV3`` with ``DeepLabHead``) on the last backbone level.

    Args:
        arch: a registered RepVGG name or a ``features_only`` backbone returning levels ``(4,)`` (``(3, 4)`` with
            ``aux_loss``).
        num_classes: output classes.
        output_stride: 8 or 16 (the last stages are dilated instead of strided), or 32.
        aux_loss: add torchvision's ``FCNHead`` on level 3 (output ``"aux"``).
        deploy, frozen_stages, norm_eval, backbone_kwargs: as :func:`repvgg_fasterrcnn`.

    Returns:
        A model whose ``forward`` returns ``{"out": logits}`` (and ``"aux"``) at the input resolution.
    """
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    out_indices, names = ((3, 4), ("aux", "out")) if aux_loss else ((4,), ("out",))
    body = feature_backbone(
        arch, out_indices, deploy=deploy, output_stride=output_stride, frozen_stages=frozen_stages,
        norm_eval=norm_eval, backbone_kwargs=backbone_kwargs,
    )
    channels = body.feature_info.channels()
    aux = FCNHead(channels[0], num_classes) if aux_loss else None
    return DeepLabV3(NamedFeatures(body, names), DeepLabHead(channels[-1], num_classes), aux)


def synthetic_shapes(
    num_images: int, image_size: int = 128, num_classes: int = 3, max_objects: int = 3, seed: int = 0,
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A tiny synthetic detection/segmentation set: filled rectangles on noise, one colour per class.

    Returns:
        ``(images, targets)``: images ``(3, S, S)`` in [0, 1]; targets with ``boxes`` ``(K, 4)`` (x1, y1, x2, y2,
        float), ``labels`` ``(K,)`` in ``1..num_classes`` and ``mask`` ``(S, S)`` (int64 class per pixel, 0 = none;
        later rectangles paint over earlier ones).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, generator=gen) * 0.8 + 0.2
    images, targets = [], []
    for _ in range(num_images):
        img = torch.rand(3, image_size, image_size, generator=gen) * 0.3
        mask = torch.zeros(image_size, image_size, dtype=torch.int64)
        count = int(torch.randint(1, max_objects + 1, (1,), generator=gen))
        boxes, labels = [], []
        for _ in range(count):
            w, h = (torch.randint(image_size // 6, image_size // 2, (2,), generator=gen)).tolist()
            x1 = int(torch.randint(0, image_size - w, (1,), generator=gen))
            y1 = int(torch.randint(0, image_size - h, (1,), generator=gen))
            label = int(torch.randint(1, num_classes + 1, (1,), generator=gen))
            img[:, y1:y1 + h, x1:x1 + w] = colours[label - 1, :, None, None]
            mask[y1:y1 + h, x1:x1 + w] = label
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(label)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64), "mask": mask})
    return images, targets


def compare_detections(
    reference: Sequence[Mapping[str, Tensor]], candidate: Sequence[Mapping[str, Tensor]], *,
    box_tol: float, score_tol: float = DETECTION_SCORE_TOL,
) -> dict[str, Any]:
    """Compare two detectors' outputs (torchvision format: per image ``boxes``, ``scores``, ``labels``).

    Detections are paired in order, or (when near-equal scores swapped places) greedily by label, box and score.
    The sets are the same when every image has the same number of detections and every reference detection has a
    partner with the same label, every box coordinate within ``box_tol`` and the score within ``score_tol``.

    Args:
        reference, candidate: lists of per-image dicts.
        box_tol: largest allowed coordinate difference in pixels (scale it with the image size).
        score_tol: largest allowed score difference.

    Returns:
        ``{"same": bool, "detections": int, "max_box_diff": float, "max_score_diff": float, "reason": str}``.
    """
    import torch

    result: dict[str, Any] = {"same": True, "detections": 0, "max_box_diff": 0.0, "max_score_diff": 0.0,
                              "reason": ""}

    def fail(reason: str) -> dict[str, Any]:
        result.update(same=False, reason=reason)
        return result

    if len(reference) != len(candidate):
        return fail(f"{len(reference)} vs {len(candidate)} images")
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        rb, cb = ref["boxes"].detach().double(), cand["boxes"].detach().double()
        rs, cs = ref["scores"].detach().double(), cand["scores"].detach().double()
        rl, cl = ref["labels"], cand["labels"]
        if len(rb) != len(cb):
            return fail(f"image {i}: {len(rb)} vs {len(cb)} detections")
        result["detections"] += len(rb)
        if not len(rb):
            continue
        order = list(range(len(rb)))
        in_order = bool((rl == cl).all()) and float((rb - cb).abs().max()) <= box_tol and \
            float((rs - cs).abs().max()) <= score_tol
        if not in_order:
            box_diff = (rb[:, None, :] - cb[None, :, :]).abs().amax(-1)
            score_diff = (rs[:, None] - cs[None, :]).abs()
            ok = (rl[:, None] == cl[None, :]) & (box_diff <= box_tol) & (score_diff <= score_tol)
            used: set[int] = set()
            for r in range(len(rb)):
                partners = [int(c) for c in torch.nonzero(ok[r]).flatten() if int(c) not in used]
                if not partners:
                    return fail(f"image {i}: detection {r} (label {int(rl[r])}, score {float(rs[r]):.4f}) "
                                "has no partner within tolerance")
                best = min(partners, key=lambda c, r=r: float(box_diff[r, c]))
                used.add(best)
                order[r] = best
        idx = torch.tensor(order)
        result["max_box_diff"] = max(result["max_box_diff"], float((rb - cb[idx]).abs().max()))
        result["max_score_diff"] = max(result["max_score_diff"], float((rs - cs[idx]).abs().max()))
    return result
