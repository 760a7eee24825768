"""The architecture a state dict describes: named (``--arch``, the checkpoint's own metadata) or read from shapes.

A conversion works the architecture out once: :func:`resolve_arch` checks a named architecture against the tensors,
else reads widths, depths, groups, SE and branch switches from the shapes (:func:`infer_repvgg_spec`,
:func:`infer_vgg_name`). What weights cannot tell (strides where no identity branch shows them, dilation, BatchNorm
epsilon) comes from the checkpoint's metadata (:func:`checkpoint_hints`) or from the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layouts import LAYOUTS, Block, ConversionError, LayoutError, find_blocks

__all__ = [
    "Arch", "ArchHints", "RepVGGSpec", "checkpoint_hints", "infer_repvgg_spec", "infer_vgg_name", "normalize_arch",
    "resolve_arch", "state_dict_mismatch",
]

log = logging.getLogger(__name__)


@dataclass
class RepVGGSpec:
    """A RepVGG architecture read from tensor shapes; ``name`` is the zoo model it matches, if any."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    layer_groups: dict[int, int]
    se_ratio: float = 0.0
    num_classes: int = 1000
    in_chans: int = 3
    strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    use_1x1: bool = True
    use_identity: bool = True
    name: str | None = None
    qa: bool = False  # QARepVGG blocks

    def _kwargs(self) -> dict:
        kw: dict = {}
        if self.in_chans != 3:
            kw["in_chans"] = self.in_chans
        if tuple(self.strides) != (2, 2, 2, 2, 2):
            kw["strides"] = tuple(self.strides)
            kw["output_stride"] = math.prod(self.strides)
        if not self.use_1x1:
            kw["use_1x1"] = False
        if not self.use_identity:
            kw["use_identity"] = False
        return kw

    def build(self, deploy: bool = False, **kwargs: Any) -> nn.Module:
        """Our model of this architecture (on the current default device); ``kwargs`` override the builder's."""
        from ..models import RepVGG, create_model

        kwargs = {**self._kwargs(), **kwargs}
        if self.name:
            return create_model(self.name, num_classes=self.num_classes, deploy=deploy, **kwargs)
        if self.qa:
            from ..blocks import QARepVGGBlock

            kwargs.setdefault("block", QARepVGGBlock)
        return RepVGG(self.widths, self.depths, self.layer_groups, num_classes=self.num_classes,
                      se_ratio=self.se_ratio, deploy=deploy, **kwargs)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._kwargs().items())
        if self.name:
            return f"{self.name} ({extra})" if extra else self.name
        groups = f", layer_groups={self.layer_groups}" if self.layer_groups else ""
        se = f", se_ratio={self.se_ratio:.4g}" if self.se_ratio else ""
        family = "QARepVGG" if self.qa else "RepVGG"
        return (f"custom {family}(widths={list(self.widths)}, depths={list(self.depths)}{groups}{se}"
                f"{', ' + extra if extra else ''})")


def infer_repvgg_spec(sd: Mapping[str, Tensor], blocks: list[Block] | None = None) -> RepVGGSpec:
    """The RepVGG architecture of a standalone state dict in our layout (training or deploy form).

    ``blocks`` are its blocks when the caller has found them already
    (:func:`~repvgg_tools.conversion.layouts.find_blocks`).

    Widths, depths, groups per layer, SE width, branch switches and classes come from shapes; strides are 2 except
    where a stage's first block has an identity branch (training form). Dilation cannot be read from weights.

    Raises:
        LayoutError: the blocks do not form a RepVGG (missing stem, gaps, inconsistent widths, ...).
    """
    from ..models.qarepvgg import QAREPVGG_CONFIGS
    from ..models.repvgg import REPVGG_CONFIGS, groupwise_layers, repvgg_widths

    layout = LAYOUTS["ours"]
    found, blocks = find_blocks(sd, layout) if blocks is None else blocks, {}
    for b in found:
        pos = layout.parse_position(b.prefix)
        if pos is None or pos[0] != "":
            raise LayoutError(f"block {b.prefix!r} is not at a stem/stage position of a RepVGG")
        blocks[pos[1:]] = b
    if (0, 0) not in blocks:
        raise LayoutError("no stem block: not a RepVGG classifier or backbone")
    depths = [sum(1 for (s, _) in blocks if s == stage) for stage in range(5)]
    contiguous = all((s, j) in blocks for s in range(5) for j in range(depths[s]))
    if not contiguous or sum(depths) != len(blocks) or 0 in depths or depths[0] != 1:
        raise LayoutError(f"blocks per stage {depths} do not form the 5 contiguous stages of a RepVGG")
    widths, layer_groups, strides, ses = [], {}, [2] * 5, []
    has_1x1, missing_identity, in_ch, layer, qa = set(), False, None, 0, set()
    for stage in range(5):
        for j in range(depths[stage]):
            b = blocks[(stage, j)]
            w = sd[b.keys["reparam.weight" if b.deployed else "branch_3x3.conv.weight"]]
            if w.dim() != 4:
                raise LayoutError(f"{b.prefix}: conv weight of shape {tuple(w.shape)} is not 4-D")
            out_ch = w.shape[0]
            if in_ch is None:
                in_ch = w.shape[1]
                in_chans = in_ch
            if in_ch % w.shape[1]:
                raise LayoutError(f"{b.prefix}: {w.shape[1]} input channels per group do not divide {in_ch}")
            if in_ch // w.shape[1] != 1:
                layer_groups[layer] = in_ch // w.shape[1]
            if not b.deployed:
                has_1x1.add(b.has("branch_1x1"))
                qa.add(b.has("post_bn"))
                if b.has("post_bn"):  # QARepVGG's identity has no tensors: it shows neither strides nor ablations
                    pass
                elif b.has("branch_identity") and j == 0:
                    strides[stage] = 1
                elif in_ch == out_ch and not b.has("branch_identity") and (j > 0 or strides[stage] == 1):
                    missing_identity = True
            if "se.down.weight" in b.keys:
                ses.append((out_ch, sd[b.keys["se.down.weight"]].shape[0]))
            if j == depths[stage] - 1:
                widths.append(out_ch)
            elif out_ch != sd[blocks[(stage, j + 1)].keys[
                    "reparam.weight" if blocks[(stage, j + 1)].deployed else "branch_3x3.conv.weight"]].shape[0]:
                raise LayoutError(f"stage {stage} changes width inside the stage")
            in_ch, layer = out_ch, layer + 1
    if len(has_1x1) > 1:
        raise LayoutError("some blocks have a 1x1 branch and some do not")
    if len(qa) > 1:
        raise LayoutError("some blocks are QARepVGG blocks (a BatchNorm after the sum) and some are not")
    if ses and len(ses) != len(blocks):
        raise LayoutError("some blocks have squeeze-excitation and some do not")
    se_ratio = _se_ratio(ses)
    head = sd.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    if head is not None and (head.dim() != 2 or head.shape[1] != widths[-1]):
        raise LayoutError(f"head.fc.weight of shape {tuple(head.shape)} does not take {widths[-1]} features")
    spec = RepVGGSpec(tuple(widths), tuple(depths), layer_groups, se_ratio, num_classes, in_chans, tuple(strides),
                      has_1x1 != {False}, not missing_identity, qa=qa == {True})
    for name, cfg in (QAREPVGG_CONFIGS if spec.qa else REPVGG_CONFIGS).items():
        if (tuple(repvgg_widths(cfg.a, cfg.b)) == spec.widths and tuple(cfg.depths) == spec.depths
                and groupwise_layers(cfg.groups, cfg.depths) == layer_groups
                and all(max(1, int(c * cfg.se_ratio)) == r for c, r in ses) and bool(cfg.se_ratio) == bool(ses)):
            spec.name, spec.se_ratio = name, cfg.se_ratio
            break
    return spec


def _se_ratio(ses: list[tuple[int, int]]) -> float:
    """A ratio ``r`` with ``max(1, int(C * r)) == reduced`` for every block (what :class:`SEBlock` computes)."""
    if not ses:
        return 0.0
    c0, r0 = ses[0]
    for ratio in (r0 / c0, (r0 + 1e-6) / c0, (r0 + 0.5) / c0):
        if all(max(1, int(c * ratio)) == r for c, r in ses):
            return ratio
    raise LayoutError(f"squeeze-excitation widths {ses[:4]} follow no single reduction ratio")


def infer_vgg_name(sd: Mapping[str, Tensor]) -> tuple[str | None, int]:
    """``(zoo name, num_classes)`` of a standalone torchvision-layout VGG state dict (training or deploy form);
    the name is ``None`` when no zoo VGG has exactly these keys and shapes."""
    from ..models import create_model, list_models

    head = sd.get("classifier.6.weight")
    num_classes = int(head.shape[0]) if head is not None else 1000
    has_bn = any(k.endswith("running_var") for k in sd)
    for name in list_models("vgg*"):
        if name.endswith("_bn") != has_bn:
            continue
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
        if state_dict_mismatch(model, sd) is None:
            return name, num_classes
    return None, num_classes


def state_dict_mismatch(model: nn.Module, sd: Mapping[str, Tensor], limit: int = 3) -> str | None:
    """``None`` when ``sd`` has exactly ``model``'s keys and shapes (``num_batches_tracked`` optional), else a
    one-line description of the first differences."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for k, shape in expected.items():
        if k not in sd:
            if not k.endswith("num_batches_tracked"):
                problems.append(f"missing {k}")
        elif tuple(sd[k].shape) != shape:
            problems.append(f"{k} has shape {tuple(sd[k].shape)}, expected {shape}")
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    if not problems:
        return None
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


# ------------------------------------------------------------------------------------------------- architecture
@dataclass
class ArchHints:
    """What a checkpoint's metadata says that its tensors cannot.

    Attributes:
        arch: a model name (``arch`` entry; the official ``main.py``'s ``config.MODEL.ARCH``; timm ``args.model``).
        model_kwargs: builder keyword arguments saved with the weights (strides, dilation via ``output_stride``...).
        bn_eps: the BatchNorm epsilon the model was trained with (``bn_eps`` entry), ``None`` when not recorded.
    """

    arch: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    bn_eps: float | None = None


def _lookup(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def checkpoint_hints(extras: Mapping[str, Any]) -> ArchHints:
    """The :class:`ArchHints` in a checkpoint's non-model entries (``CheckpointContents.extras``)."""
    from ..models import is_model

    # timm's train.py saves its model's class name as "arch" ("byobnet") and the model's name in args.model
    names = [a for a in (_lookup(extras, "arch"), _lookup(extras, "config", "MODEL", "ARCH"),
                         _lookup(extras, "args", "model")) if isinstance(a, str) and a]
    arch = next((a for a in names if is_model(normalize_arch(a))), names[0] if names else None)
    kwargs = extras.get("model_kwargs")
    eps = next((e for e in (_lookup(extras, "bn_eps"), _lookup(extras, "meta", "bn_eps"))
                if isinstance(e, (int, float)) and not isinstance(e, bool)), None)
    return ArchHints(arch, dict(kwargs) if isinstance(kwargs, Mapping) else {}, None if eps is None else float(eps))


@dataclass
class Arch:
    """A buildable architecture that fits a state dict.

    Attributes:
        name: the zoo name, or a description of a custom RepVGG.
        num_classes, in_chans: read from the weights.
        build: ``build(deploy)`` makes the model (on the current default device).
        unknown: what the weights could not tell and nothing else said (a message naming what to pass), or ``""``.
    """

    name: str
    num_classes: int
    build: Callable[[bool], nn.Module]
    in_chans: int = 3
    unknown: str = ""


def normalize_arch(name: str) -> str:
    """``RepVGG-A0`` (official spelling) -> ``repvgg_a0``."""
    return name.strip().lower().replace("-", "_")


def resolve_arch(canon: Mapping[str, Tensor], arch: str | None, hints: ArchHints | None, vgg: bool, deploy: bool,
                 blocks: list[Block] | None = None) -> Arch | None:
    """The architecture of a standalone state dict in our layout: ``arch`` (must fit), else the checkpoint's own
    arch (``hints``) when it fits, else inferred from shapes. ``None`` when nothing fits (verify block by block).

    ``hints.model_kwargs`` go to the builder either way. ``blocks`` are ``canon``'s blocks, when already found.

    Raises:
        ConversionError: an unknown ``arch``, weights that do not fit it, or ``model_kwargs`` the builder refuses.
    """
    from ..models import create_model, is_model, list_models

    hints = hints or ArchHints()
    kwargs = dict(hints.model_kwargs)
    head = canon.get("classifier.6.weight" if vgg else "head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else (1000 if vgg else 0)
    stem = canon.get("features.0.weight" if vgg else ("stem.reparam.weight" if deploy else
                                                       "stem.branch_3x3.conv.weight"))
    in_chans = int(stem.shape[1]) if stem is not None else 3

    def build(name: str, deploy: bool) -> nn.Module:
        try:
            return create_model(name, num_classes=num_classes, deploy=deploy, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{name}: the checkpoint's model_kwargs {kwargs} do not fit ({exc})") from None

    def named(name: str) -> Arch | str:
        with torch.device("meta"):
            model = build(name, deploy)
        problem = state_dict_mismatch(model, canon)
        if problem:
            return problem
        return Arch(name, num_classes, lambda d: build(name, d), in_chans)

    if arch is not None:
        if not is_model(arch):
            close = [m for m in list_models() if m.split("_")[0] in arch.lower()] or list_models()
            raise ConversionError(f"unknown arch {arch!r}; known models: {', '.join(close)}")
        found = named(arch)
        if isinstance(found, str):
            raise ConversionError(f"weights do not fit --arch {arch}: {found}")
        return found
    if hints.arch and is_model(normalize_arch(hints.arch)):
        found = named(normalize_arch(hints.arch))
        if not isinstance(found, str):
            return found
        log.warning("checkpoint says arch=%s but its weights do not fit (%s); inferring from shapes", hints.arch,
                    found)
    if vgg:
        name, _ = infer_vgg_name(canon)
        found = named(name) if name else None
        return found if isinstance(found, Arch) else None
    try:
        spec: RepVGGSpec = infer_repvgg_spec(canon, blocks)
    except LayoutError as exc:
        log.warning("cannot read a RepVGG architecture from the weights (%s); verifying block by block", exc)
        return None
    unknown = ""
    if kwargs:  # the saved builder arguments know the strides and dilation; the shapes only guess them
        spec.strides = (2, 2, 2, 2, 2)
    elif tuple(spec.strides) != (2, 2, 2, 2, 2):
        stage = next(i for i, s in enumerate(spec.strides) if s != 2)
        unknown = (f"stage {stage} runs at stride 1 (its first block has an identity branch), so this model was "
                   "built with a smaller output stride, whose dilation the weights do not record; pass "
                   "model_kwargs={'output_stride': 8 or 16} (repvgg-export --output-stride)")

    def build_spec(deploy: bool) -> nn.Module:
        try:
            return spec.build(deploy, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"the checkpoint's model_kwargs {kwargs} do not fit {spec.describe()} "
                                  f"({exc})") from None

    return Arch(spec.describe(), spec.num_classes, build_spec, spec.in_chans, unknown)
