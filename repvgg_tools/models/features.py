"""Multi-scale feature extraction: ``feature_info``, output stride by dilation, frozen stages, BN kept in eval mode.

``create_model(name, features_only=True, out_indices=...)`` returns a backbone whose ``forward`` returns a list of
feature maps (one per entry of ``out_indices``, shallowest first) and whose ``feature_info`` follows timm's
convention (:class:`FeatureInfo`). Feature levels are the five stages of the network: RepVGG's ``stem`` (level 0)
and ``stages.0..3`` (levels 1-4); VGG's five blocks, each ending in a max pool. The classifier is simply absent and
every other module keeps its name, so a classifier checkpoint loads with :func:`load_backbone_weights`.

Fine-tuning options follow MMPretrain: ``frozen_stages=k`` freezes levels ``0..k`` (RepVGG: the stem and the first
``k`` body stages; ``-1`` freezes nothing): their parameters get ``requires_grad=False`` and the modules stay in
eval mode through ``train()``. ``norm_eval=True`` keeps every BatchNorm in eval mode through ``train()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy

from torch import Tensor, nn

__all__ = [
    "FeatureInfo", "VGGFeatures", "create_features", "load_backbone_weights", "normalize_out_indices",
    "output_stride_schedule", "freeze_modules", "set_norm_eval", "check_frozen_stages", "NUM_LEVELS",
]

log = logging.getLogger(__name__)

NUM_LEVELS = 5  # stem/stage 0 + four stages for RepVGG; five pooled blocks for VGG
OUTPUT_STRIDES = (8, 16, 32)


class FeatureInfo:
    """Channels, reduction and module name of every feature level, and the levels a backbone returns.

    Mirrors timm's ``FeatureInfo``: ``info`` lists one dict per level (``num_chs``, ``reduction``, ``module``,
    ``index``); accessors without ``idx`` answer for ``out_indices``, in output order.

    Args:
        info: one dict per feature level, shallowest first.
        out_indices: the levels returned by ``forward``.
    """

    def __init__(self, info: Sequence[Mapping], out_indices: Sequence[int]) -> None:
        self.info = [dict(d, index=d.get("index", i)) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        """The same levels with other ``out_indices``."""
        return FeatureInfo(deepcopy(self.info), out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        """Value of ``key`` per output level (``idx=None``), for one level index, or for a list of them."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        """Info dicts (restricted to ``keys``) per output level, for one level index, or for a list of them."""
        def pick(i: int) -> dict:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None):
        """Channels of the output feature maps."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        """Stride of the output feature maps relative to the input."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        """Name of the module whose output is each feature map."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


def normalize_out_indices(out_indices: Iterable[int] | int | None, num_levels: int = NUM_LEVELS) -> tuple[int, ...]:
    """Sorted, unique, non-negative level indices; ``None`` means every level, an int ``n`` the last ``n`` levels.

    Raises:
        ValueError: an index outside ``[-num_levels, num_levels)`` or an empty selection.
    """
    if out_indices is None:
        return tuple(range(num_levels))
    if isinstance(out_indices, int):
        if not 0 < out_indices <= num_levels:
            raise ValueError(f"out_indices={out_indices}: expected 1..{num_levels} levels")
        return tuple(range(num_levels - out_indices, num_levels))
    result = set()
    for i in out_indices:
        if not -num_levels <= int(i) < num_levels:
            raise ValueError(f"out_indices entry {i} is outside the {num_levels} feature levels (0..{num_levels - 1})")
        result.add(int(i) % num_levels)
    if not result:
        raise ValueError("out_indices is empty")
    return tuple(sorted(result))


def output_stride_schedule(
    strides: Sequence[int], dilations: Sequence[int], output_stride: int | None = None,
) -> tuple[list[int], list[int]]:
    """Per-stage strides and dilations reaching ``output_stride``: once the network stride reaches it, a stage's
    stride becomes 1 and multiplies the dilation of that stage and every later one (DeepLab's scheme).

    Args:
        strides, dilations: the undilated per-stage schedule (dilations must be all 1 unless ``output_stride`` is the
            natural stride).
        output_stride: 8, 16 or 32; ``None`` (or the network's own stride) keeps the schedule as given.

    Raises:
        ValueError: another output stride, or explicit dilations combined with ``output_stride``.
    """
    strides, dilations = list(strides), list(dilations)
    natural = 1
    for s in strides:
        natural *= s
    if output_stride is None or output_stride == natural:
        return strides, dilations
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if output_stride > natural:
        raise ValueError(f"output_stride={output_stride} exceeds the network stride {natural}")
    if any(d != 1 for d in dilations):
        raise ValueError("pass either explicit dilations or output_stride, not both")
    net_stride, dilation = 1, 1
    for i, s in enumerate(strides):
        if net_stride >= output_stride and s > 1:
            dilation *= s
            strides[i] = 1
        else:
            net_stride *= s
        dilations[i] = dilation
    return strides, dilations


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` in eval mode and set ``requires_grad=False`` on their parameters."""
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def set_norm_eval(module: nn.Module) -> int:
    """Put every BatchNorm (any ``_BatchNorm``) under ``module`` in eval mode; returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            count += 1
    return count


def check_frozen_stages(frozen_stages: int, num_levels: int) -> int:
    """Validate ``frozen_stages`` against the levels a backbone has; returns it."""
    if not -1 <= frozen_stages < num_levels:
        raise ValueError(f"frozen_stages={frozen_stages}: expected -1 (none) .. {num_levels - 1} (all levels built)")
    return frozen_stages


class VGGFeatures(nn.Module):
    """VGG as a feature backbone: the ``features`` stack (torchvision's keys), returning the output of each max pool.

    Level ``i`` is the output of the ``i``-th max pool (reduction ``2**(i+1)``). Layers after the last requested
    pool are not built.

    Args:
        cfg: a list from :data:`repvgg_tools.models.vgg.VGG_CONFIGS`.
        batch_norm: BatchNorm after every conv (``_bn`` variants in training form).
        in_chans: input channels.
        out_indices: levels to return (see :func:`normalize_out_indices`).
        frozen_stages: freeze levels ``0..frozen_stages`` (``-1``: none).
        norm_eval: keep BatchNorms in eval mode in ``train()``.
    """

    def __init__(
        self, cfg: Sequence, batch_norm: bool = False, *, in_chans: int = 3,
        out_indices: Iterable[int] | int | None = None, frozen_stages: int = -1, norm_eval: bool = False,
    ) -> None:
        super().__init__()
        from .vgg import make_vgg_features

        self.out_indices = normalize_out_indices(out_indices)
        full = make_vgg_features(cfg, batch_norm, in_chans)
        layers, pools = [], 0
        for layer in full:
            layers.append(layer)
            pools += isinstance(layer, nn.MaxPool2d)
            if pools > max(self.out_indices):
                break
        self.features = nn.Sequential(*layers)
        self.features_only = True
        self.frozen_stages = check_frozen_stages(frozen_stages, pools)
        self.norm_eval = norm_eval
        self._apply_finetune_modes()

    def _levels(self) -> list[list[nn.Module]]:
        """Layers of each level (every layer up to and including a max pool), recomputed after BN folding."""
        levels: list[list[nn.Module]] = [[]]
        for layer in self.features:
            levels[-1].append(layer)
            if isinstance(layer, nn.MaxPool2d):
                levels.append([])
        return levels[:-1]

    @property
    def feature_info(self) -> FeatureInfo:
        """Levels of this backbone; module names follow the current ``features`` indices."""
        info, channels, reduction = [], 0, 1
        for idx, layer in enumerate(self.features):
            if isinstance(layer, nn.Conv2d):
                channels = layer.out_channels
            elif isinstance(layer, nn.MaxPool2d):
                reduction *= 2
                info.append({"num_chs": channels, "reduction": reduction, "module": f"features.{idx}"})
        return FeatureInfo(info, self.out_indices)

    def _apply_finetune_modes(self) -> None:
        if self.frozen_stages >= 0:
            freeze_modules(m for level in self._levels()[: self.frozen_stages + 1] for m in level)
        if self.norm_eval and self.training:
            set_norm_eval(self)

    def train(self, mode: bool = True) -> VGGFeatures:
        super().train(mode)
        self._apply_finetune_modes()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        outs, level = [], 0
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                if level in self.out_indices:
                    outs.append(x)
                level += 1
        return outs


def _vgg_variant(name: str) -> tuple[str, bool] | None:
    """``(config name, batch_norm)`` of a registered VGG name, or ``None``."""
    from . import vgg

    base, bn = (name[:-3], True) if name.endswith("_bn") else (name, False)
    cfg = vgg.VGG_VARIANTS.get(base)
    return (cfg, bn) if cfg is not None else None


def create_features(name: str, builder: Callable[..., nn.Module], deploy: bool = False, **kwargs) -> nn.Module:
    """Build the feature backbone of a registered model (called by ``create_model(..., features_only=True)``).

    Args:
        name: registered model name.
        builder: its registered builder (RepVGG builders accept ``features_only``).
        deploy: build the plain form directly.
        **kwargs: ``out_indices``, ``output_stride``, ``frozen_stages``, ``norm_eval``, ``in_chans`` and builder
            options. ``num_classes`` is ignored.

    Raises:
        ValueError: a model without a feature form, or options it does not support.
    """
    kwargs.pop("num_classes", None)
    vgg = _vgg_variant(name)
    if vgg is not None:
        output_stride = kwargs.pop("output_stride", None)
        if output_stride not in (None, 32):
            raise ValueError(f"{name}: output_stride={output_stride} is not supported for VGG (only 32)")
        from .vgg import VGG_CONFIGS

        cfg, bn = vgg
        try:
            return VGGFeatures(VGG_CONFIGS[cfg], batch_norm=bn and not deploy, **kwargs)
        except TypeError as exc:
            raise ValueError(f"{name}: unsupported option for features_only ({exc})") from None
    try:
        return builder(num_classes=0, deploy=deploy, features_only=True, **kwargs)
    except TypeError as exc:
        if "features_only" in str(exc):
            raise ValueError(f"model {name!r} has no features_only form") from None
        raise


def load_backbone_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "",
) -> list[str]:
    """Load a classifier (or other) checkpoint's backbone tensors into a feature backbone.

    Every tensor of ``model`` must be present (after removing ``prefix`` from the checkpoint's keys); keys the
    backbone does not have (the classifier head, stages beyond the last requested level) are skipped and returned.

    Args:
        model: a ``features_only`` backbone (or any module).
        state_dict: tensors, e.g. ``create_model("repvgg_a0").state_dict()``; training or deploy form matching
            ``model``'s form.
        prefix: only keys starting with it are used, with it removed (e.g. ``"backbone.body."``).

    Returns:
        The skipped keys (with the prefix removed).

    Raises:
        ValueError: a tensor of ``model`` is missing from the checkpoint, or shapes differ.
    """
    own = model.state_dict()
    picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in picked]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint lacks {len(missing)} backbone tensors, e.g. {', '.join(missing[:3])}{more}; "
                         "is it the same form (training vs deploy) and architecture?")
    skipped = [k for k in picked if k not in own]
    try:
        model.load_state_dict({k: v for k, v in picked.items() if k in own}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint does not fit the backbone: {str(exc).splitlines()[-1].strip()}") from None
    log.info("loaded %d backbone tensors, skipped %d (%s...)", len(own), len(skipped), ", ".join(skipped[:3]))
    return skipped

