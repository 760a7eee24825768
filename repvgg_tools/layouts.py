"""Checkpoint key layouts of RepVGG implementations, their detection, and the architecture their tensors describe.

A RepVGG block is found by the key of its 3x3 conv (training form) or of its fused conv (deploy form), under any
prefix, so a block inside a detector (``backbone.body.stages.1.0...``) is found like one in a classifier.

=============  ============================================  =======================  ================  ==========
layout         training block (one stage-1 block)            deploy block             stem / stages     head
=============  ============================================  =======================  ================  ==========
``ours``       ``stages.0.0.branch_3x3.{conv,bn}``,          ``reparam``              ``stem``,         ``head.fc``
               ``branch_1x1.{conv,bn}``, ``branch_identity``,                          ``stages.{0-3}``
               ``se.{down,up}``
``official``   ``stage1.0.rbr_dense.{conv,bn}``, ``rbr_1x1``,  ``rbr_reparam``          ``stage0``,       ``linear``
               ``rbr_identity``, ``se.{down,up}``                                      ``stage{1-4}``
``timm``       ``stages.0.0.conv_kxk.{conv,bn}``,            ``reparam_conv``         ``stem``,         ``head.fc``
               ``conv_1x1``, ``identity``, ``attn.{fc1,fc2}``                          ``stages.{0-3}``
``mmpretrain`` ``backbone.stage_1.0.branch_3x3.{conv,norm}``, ``branch_reparam``      ``backbone.stem``, ``head.fc``
               ``branch_1x1``, ``branch_norm``,                                        ``stage_{1-4}``
               ``se_layer.conv{1,2}.conv``
=============  ============================================  =======================  ================  ==========

``torchvision`` is VGG(-BN): ``features.N`` (conv with bias, BN at the next index), ``classifier.{0,3,6}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "Layout", "LAYOUTS", "LAYOUT_NAMES", "Block", "LayoutError", "detect_layout", "find_blocks", "block_key",
    "map_block_prefix", "map_head_key", "rename_layout", "is_standalone", "find_vgg_pairs", "VggPair", "vgg_index_map",
    "RepVGGSpec", "infer_repvgg_spec", "infer_vgg_name", "state_dict_mismatch",
]

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CONV_PARAMS = ("weight", "bias")
# our module paths inside a block, and the parameters each may hold
ROLES: dict[str, tuple[str, ...]] = {
    "branch_3x3.conv": CONV_PARAMS, "branch_3x3.bn": BN_PARAMS,
    "branch_1x1.conv": CONV_PARAMS, "branch_1x1.bn": BN_PARAMS,
    "branch_identity": BN_PARAMS,
    "se.down": CONV_PARAMS, "se.up": CONV_PARAMS,
    "reparam": CONV_PARAMS,
}
LAYOUT_NAMES = ("ours", "official", "timm", "mmpretrain", "torchvision")


class LayoutError(ValueError):
    """The tensors do not form a layout we know; the message says which key is wrong."""


@dataclass(frozen=True)
class Layout:
    """How one project names the tensors of a RepVGG classifier.

    Attributes:
        name: layout name.
        modules: our module path inside a block (see ``ROLES``) -> this layout's.
        stem: the stem block's name.
        stage_re: regex of a stage block's name, groups (stage number, block index).
        stage_base: the regex's stage number of paper stage 1 (0 for ours/timm, 1 for official/mmpretrain).
        stage_fmt: format of a stage block's name from ``s`` (the regex's stage number) and ``j``.
        root: where the backbone lives in a standalone classifier (``""`` or ``"backbone."``).
        head: the classifier's linear layer.
    """

    name: str
    modules: Mapping[str, str]
    stem: str
    stage_re: str
    stage_base: int
    stage_fmt: str
    root: str
    head: str
    suffixes: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # this layout's key suffix inside a block -> ours ("rbr_dense.bn.weight" -> "branch_3x3.bn.weight")
        table = {f"{self.modules[role]}.{p}": f"{role}.{p}" for role, params in ROLES.items() for p in params}
        object.__setattr__(self, "suffixes", table)

    def key(self, role_param: str) -> str:
        """This layout's suffix for our ``role.param`` (``"branch_3x3.conv.weight"``)."""
        role, _, param = role_param.rpartition(".")
        return f"{self.modules[role]}.{param}"

    def stage_name(self, stage: int, index: int) -> str:
        """Name of block ``index`` of paper stage ``stage`` (0 = stem)."""
        return self.stem if stage == 0 else self.stage_fmt.format(s=stage - 1 + self.stage_base, j=index)

    def parse_position(self, prefix: str) -> tuple[str, int, int] | None:
        """``(root, paper stage, block index)`` of a block prefix, the root with its trailing dot; ``None`` if the
        name is not a stem/stage name of this layout."""
        m = re.fullmatch(rf"(?P<root>(?:.*\.)?)(?:(?P<stem>{re.escape(self.stem)})|{self.stage_re})", prefix)
        if m is None:
            return None
        if m.group("stem") is not None:
            return m.group("root"), 0, 0
        return m.group("root"), int(m.group("s")) - self.stage_base + 1, int(m.group("j"))


_OURS_MODULES = {role: role for role in ROLES}
LAYOUTS: dict[str, Layout] = {
    "ours": Layout("ours", _OURS_MODULES, "stem", r"stages\.(?P<s>\d+)\.(?P<j>\d+)", 0, "stages.{s}.{j}", "",
                   "head.fc"),
    "official": Layout(
        "official",
        {"branch_3x3.conv": "rbr_dense.conv", "branch_3x3.bn": "rbr_dense.bn", "branch_1x1.conv": "rbr_1x1.conv",
         "branch_1x1.bn": "rbr_1x1.bn", "branch_identity": "rbr_identity", "se.down": "se.down", "se.up": "se.up",
         "reparam": "rbr_reparam"},
        "stage0", r"stage(?P<s>[1-9]\d*)\.(?P<j>\d+)", 1, "stage{s}.{j}", "", "linear"),
    "timm": Layout(
        "timm",
        {"branch_3x3.conv": "conv_kxk.conv", "branch_3x3.bn": "conv_kxk.bn", "branch_1x1.conv": "conv_1x1.conv",
         "branch_1x1.bn": "conv_1x1.bn", "branch_identity": "identity", "se.down": "attn.fc1", "se.up": "attn.fc2",
         "reparam": "reparam_conv"},
        "stem", r"stages\.(?P<s>\d+)\.(?P<j>\d+)", 0, "stages.{s}.{j}", "", "head.fc"),
    "mmpretrain": Layout(
        "mmpretrain",
        {"branch_3x3.conv": "branch_3x3.conv", "branch_3x3.bn": "branch_3x3.norm",
         "branch_1x1.conv": "branch_1x1.conv", "branch_1x1.bn": "branch_1x1.norm", "branch_identity": "branch_norm",
         "se.down": "se_layer.conv1.conv", "se.up": "se_layer.conv2.conv", "reparam": "branch_reparam"},
        "stem", r"stage_(?P<s>[1-9]\d*)\.(?P<j>\d+)", 1, "stage_{s}.{j}", "backbone.", "head.fc"),
}


def _ends_with(key: str, suffix: str) -> bool:
    return key == suffix or key.endswith("." + suffix)


def detect_layout(keys: Iterable[str]) -> str | None:
    """The layout whose block keys (BatchNorm running variances, fused convs) occur most; ``torchvision`` for a
    VGG-BN; ``None`` when nothing matches."""
    keys = list(keys)
    scores = {}
    for name, layout in LAYOUTS.items():
        sigs = (layout.key("branch_3x3.bn.running_var"), layout.key("reparam.weight"))
        scores[name] = sum(1 for k in keys if any(_ends_with(k, s) for s in sigs))
    best = max(scores, key=scores.get)
    if scores[best]:
        return best
    if any(True for _ in _vgg_candidates(keys)) or any(re.fullmatch(r"(.*\.)?classifier\.6\.weight", k) for k in keys):
        return "torchvision"
    return None


@dataclass
class Block:
    """One RepVGG block of a state dict.

    Attributes:
        prefix: its module path (``stages.1.0``; ``""`` for a state dict of one block).
        keys: our ``role.param`` (``branch_1x1.bn.running_var``) -> the input key.
        deployed: holds a fused conv instead of branches.
    """

    prefix: str
    keys: dict[str, str]
    deployed: bool

    def has(self, role: str) -> bool:
        return any(k.startswith(role + ".") for k in self.keys)


def block_key(prefix: str, suffix: str) -> str:
    """``prefix.suffix``, or ``suffix`` for the empty prefix."""
    return f"{prefix}.{suffix}" if prefix else suffix


def find_blocks(keys: Iterable[str], layout: Layout) -> list[Block]:
    """The RepVGG blocks among ``keys``, in key order.

    Raises:
        LayoutError: a key under a block that is no branch of a RepVGG block (an unsupported variant).
    """
    keys = list(keys)
    train_sfx, deploy_sfx = layout.key("branch_3x3.conv.weight"), layout.key("reparam.weight")
    blocks: dict[str, Block] = {}
    for k in keys:
        for sfx, deployed in ((train_sfx, False), (deploy_sfx, True)):
            if _ends_with(k, sfx):
                prefix = k[: -len(sfx)].rstrip(".")
                if prefix in blocks and blocks[prefix].deployed != deployed:
                    raise LayoutError(f"block {prefix!r} holds both training branches and a fused conv")
                blocks[prefix] = Block(prefix, {}, deployed)
    if not blocks:
        return []
    for k in keys:
        prefix = _owner(k, blocks)
        if prefix is None:
            continue
        block = blocks[prefix]
        rest = k[len(prefix) + 1:] if prefix else k
        ours = layout.suffixes.get(rest)
        if ours is None or (block.deployed != ours.startswith("reparam.") and not ours.startswith("se.")):
            raise LayoutError(f"unexpected key {k!r} in RepVGG block {prefix or '<root>'!r} ({layout.name} layout)")
        block.keys[ours] = k
    return list(blocks.values())


def _owner(key: str, blocks: Mapping[str, Block]) -> str | None:
    """The block prefix ``key`` lies under, trying the longest candidate first."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


def map_block_prefix(prefix: str, src: Layout, dst: Layout, standalone: bool) -> str:
    """The name of block ``prefix`` of layout ``src`` in layout ``dst``.

    The stem/stage part is renamed; the root moves to ``dst.root`` for a standalone classifier and stays otherwise
    (a backbone inside a detector keeps its place). Names that are no stem/stage of ``src`` stay as they are.
    """
    if src is dst:
        return prefix
    pos = src.parse_position(prefix)
    if pos is None:
        return prefix
    root, stage, index = pos
    if standalone and root == src.root:
        root = dst.root
    return root + dst.stage_name(stage, index)


def map_head_key(key: str, src: Layout, dst: Layout) -> str | None:
    """``linear.weight`` (official) -> ``head.fc.weight`` (ours/timm/mmpretrain) and back; ``None`` if no head key."""
    for param in ("weight", "bias"):
        if key == f"{src.head}.{param}":
            return f"{dst.head}.{param}"
    return None


def is_standalone(keys: Iterable[str], blocks: list[Block], layout: Layout) -> bool:
    """Whether the state dict is a RepVGG classifier/backbone of ``layout`` alone: every block at a stem/stage name
    under ``layout.root``, every other key a head key."""
    block_keys = {k for b in blocks for k in b.keys.values()}
    for b in blocks:
        pos = layout.parse_position(b.prefix)
        if pos is None or pos[0] != layout.root:
            return False
    return all(k in block_keys or map_head_key(k, layout, layout) for k in keys)


def rename_layout(
    sd: Mapping[str, Tensor], src: Layout, dst: Layout, blocks: list[Block] | None = None,
    standalone: bool | None = None,
) -> dict[str, Tensor]:
    """The same tensors (not copies) under ``dst``'s names: block branches, stem/stage names, and for a standalone
    classifier the root and the head. Other keys keep their names."""
    blocks = find_blocks(sd, src) if blocks is None else blocks
    standalone = is_standalone(sd, blocks, src) if standalone is None else standalone
    where = {k: (b, role) for b in blocks for role, k in b.keys.items()}
    out = {}
    for k, v in sd.items():
        if k in where:
            b, role = where[k]
            out[block_key(map_block_prefix(b.prefix, src, dst, standalone), dst.key(role))] = v
        else:
            out[(map_head_key(k, src, dst) if standalone else None) or k] = v
    return out


# ----------------------------------------------------------------------------------------------- torchvision VGG
@dataclass
class VggPair:
    """A conv at ``root + conv_index`` followed by its BatchNorm at ``conv_index + 1`` in a Sequential."""

    root: str
    conv_index: int

    def conv(self, param: str) -> str:
        return f"{self.root}{self.conv_index}.{param}"

    def bn(self, param: str) -> str:
        return f"{self.root}{self.conv_index + 1}.{param}"


def _vgg_candidates(keys: Iterable[str]):
    keyset = set(keys)
    for k in keyset:
        m = re.fullmatch(r"(?P<root>(?:.*\.)?features\.)(?P<i>\d+)\.weight", k)
        if m and f"{m['root']}{int(m['i']) + 1}.running_var" in keyset:
            yield VggPair(m["root"], int(m["i"]))


def find_vgg_pairs(sd: Mapping[str, Tensor]) -> list[VggPair]:
    """Conv->BatchNorm pairs of torchvision-style ``features`` Sequentials (4-D conv weight, BN at the next index),
    sorted by root and index."""
    pairs = [p for p in _vgg_candidates(sd) if sd[p.conv("weight")].dim() == 4]
    return sorted(pairs, key=lambda p: (p.root, p.conv_index))


def vgg_index_map(keys: Iterable[str], pairs: list[VggPair]) -> dict[str, str]:
    """Renaming of ``features`` keys once each BN entry leaves its Sequential: index ``i`` -> ``i - #BNs before i``
    (what :func:`repvgg_tools.reparam.fold_conv_bn` does to the module, so vgg16_bn becomes the vgg16 layout)."""
    bns: dict[str, list[int]] = {}
    for p in pairs:
        bns.setdefault(p.root, []).append(p.conv_index + 1)
    out = {}
    for k in keys:
        for root, bn_idx in bns.items():
            m = re.fullmatch(rf"{re.escape(root)}(\d+)\.(.+)", k)
            if m:
                i = int(m.group(1))
                out[k] = f"{root}{i - sum(1 for b in bn_idx if b < i)}.{m.group(2)}"
                break
    return out


# ------------------------------------------------------------------------------------- architecture from shapes
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

    def build(self, deploy: bool = False) -> nn.Module:
        """Our model of this architecture (on the current default device)."""
        from .models import RepVGG, create_model

        if self.name:
            return create_model(self.name, num_classes=self.num_classes, deploy=deploy, **self._kwargs())
        return RepVGG(self.widths, self.depths, self.layer_groups, num_classes=self.num_classes,
                      se_ratio=self.se_ratio, deploy=deploy, **self._kwargs())

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._kwargs().items())
        if self.name:
            return f"{self.name} ({extra})" if extra else self.name
        groups = f", layer_groups={self.layer_groups}" if self.layer_groups else ""
        se = f", se_ratio={self.se_ratio:.4g}" if self.se_ratio else ""
        return (f"custom RepVGG(widths={list(self.widths)}, depths={list(self.depths)}{groups}{se}"
                f"{', ' + extra if extra else ''})")


def infer_repvgg_spec(sd: Mapping[str, Tensor]) -> RepVGGSpec:
    """The RepVGG architecture of a standalone state dict in our layout (training or deploy form).

    Widths, depths, groups per layer, SE width, branch switches and classes come from shapes; strides are 2 except
    where a stage's first block has an identity branch (training form). Dilation cannot be read from weights.

    Raises:
        LayoutError: the blocks do not form a RepVGG (missing stem, gaps, inconsistent widths, ...).
    """
    from .models.repvgg import REPVGG_CONFIGS, groupwise_layers, repvgg_widths

    layout = LAYOUTS["ours"]
    blocks = {}
    for b in find_blocks(sd, layout):
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
    has_1x1, missing_identity, in_ch, layer = set(), False, None, 0
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
                if b.has("branch_identity") and j == 0:
                    strides[stage] = 1
                if in_ch == out_ch and not b.has("branch_identity") and (j > 0 or strides[stage] == 1):
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
    if ses and len(ses) != len(blocks):
        raise LayoutError("some blocks have squeeze-excitation and some do not")
    se_ratio = _se_ratio(ses)
    head = sd.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    if head is not None and (head.dim() != 2 or head.shape[1] != widths[-1]):
        raise LayoutError(f"head.fc.weight of shape {tuple(head.shape)} does not take {widths[-1]} features")
    spec = RepVGGSpec(tuple(widths), tuple(depths), layer_groups, se_ratio, num_classes, in_chans, tuple(strides),
                      has_1x1 != {False}, not missing_identity)
    for name, cfg in REPVGG_CONFIGS.items():
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
    from .models import create_model, list_models

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
