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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = [
    "Layout", "LAYOUTS", "LAYOUT_NAMES", "Block", "LayoutError", "detect_layout", "find_blocks", "block_key",
    "map_block_prefix", "map_head_key", "rename_layout", "is_standalone", "find_vgg_pairs", "VggPair", "vgg_index_map",
    "ConversionError",
]

BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CONV_PARAMS = ("weight", "bias")
# our module paths inside a block, and the parameters each may hold
ROLES: dict[str, tuple[str, ...]] = {
    "branch_3x3.conv": CONV_PARAMS, "branch_3x3.bn": BN_PARAMS,
    "branch_1x1.conv": CONV_PARAMS, "branch_1x1.bn": BN_PARAMS,
    "branch_identity": BN_PARAMS,
    # QARepVGG: a plain 1x1 conv (no BatchNorm, no bias) and one BatchNorm after the branch sum
    "branch_1x1": ("weight",), "post_bn": BN_PARAMS,
    "se.down": CONV_PARAMS, "se.up": CONV_PARAMS,
    "reparam": CONV_PARAMS,
}
LAYOUT_NAMES = ("ours", "official", "timm", "mmpretrain", "repvggplus", "torchvision")


class ConversionError(ValueError):
    """The input cannot be converted (wrong architecture, corrupt weights, unknown layout); one-line message."""


class LayoutError(ConversionError):
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
        aux: regex of training-only keys that the deploy form leaves out (RepVGGplus's auxiliary classifiers).
        modelable: our :class:`~repvgg_tools.models.RepVGG` can hold a standalone classifier of this layout
            (RepVGGplus cannot: its SE follows the ReLU and stage 3 is split in two).
    """

    name: str
    modules: Mapping[str, str]
    stem: str
    stage_re: str
    stage_base: int
    stage_fmt: str
    root: str
    head: str
    aux: str | None = None
    modelable: bool = True
    suffixes: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # this layout's key suffix inside a block -> ours ("rbr_dense.bn.weight" -> "branch_3x3.bn.weight")
        table = {f"{self.modules[role]}.{p}": f"{role}.{p}" for role, params in ROLES.items() for p in params
                 if role in self.modules}
        object.__setattr__(self, "suffixes", table)

    def key(self, role_param: str) -> str:
        """This layout's suffix for our ``role.param`` (``"branch_3x3.conv.weight"``).

        Raises:
            LayoutError: the layout has no such module (QARepVGG's in the timm layout).
        """
        role, _, param = role_param.rpartition(".")
        if role not in self.modules:
            raise LayoutError(f"the {self.name} layout has no {role} (QARepVGG blocks convert to ours or official)")
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
# QARepVGG's reference implementation (QARepVGGBlockV2) and YOLOv6's QARepVGGBlock: rbr_1x1 is a bare conv, bn the
# BatchNorm after the sum
_QA_OFFICIAL = {"branch_1x1": "rbr_1x1", "post_bn": "bn"}
LAYOUTS: dict[str, Layout] = {
    "ours": Layout("ours", _OURS_MODULES, "stem", r"stages\.(?P<s>\d+)\.(?P<j>\d+)", 0, "stages.{s}.{j}", "",
                   "head.fc"),
    "official": Layout(
        "official",
        {"branch_3x3.conv": "rbr_dense.conv", "branch_3x3.bn": "rbr_dense.bn", "branch_1x1.conv": "rbr_1x1.conv",
         "branch_1x1.bn": "rbr_1x1.bn", "branch_identity": "rbr_identity", "se.down": "se.down", "se.up": "se.up",
         "reparam": "rbr_reparam", **_QA_OFFICIAL},
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
    # the official repo's repvggplus.py: stage 3 split into stage3_first/stage3_second, SE *after* the ReLU
    "repvggplus": Layout(
        "repvggplus",
        {"branch_3x3.conv": "rbr_dense.conv", "branch_3x3.bn": "rbr_dense.bn", "branch_1x1.conv": "rbr_1x1.conv",
         "branch_1x1.bn": "rbr_1x1.bn", "branch_identity": "rbr_identity", "se.down": "post_se.down",
         "se.up": "post_se.up", "reparam": "rbr_reparam"},
        "stage0", r"stage(?P<s>[1-4])(?:_first|_second)?\.blocks\.(?P<j>\d+)", 1, "stage{s}.blocks.{j}", "", "linear",
        aux=r"stage(?:1|2|3_first)_aux\.", modelable=False),
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
    if best == "official" and any(re.match(r"(.*\.)?(stage\d(_first|_second)?\.blocks\.\d+\.|stage\d\w*_aux\.)|"
                                           r"(.*\.)?post_se\.", k) for k in keys):
        return "repvggplus"  # same branch names as the official RepVGG, but stages hold .blocks and SE is post_se
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
        layout: the layout its keys follow.
    """

    prefix: str
    keys: dict[str, str]
    deployed: bool
    layout: Layout

    def has(self, role: str) -> bool:
        return any(k.startswith(role + ".") for k in self.keys)

    def module(self, role: str) -> str:
        """The input's own name of one of our modules in this block (``branch_identity`` -> ``...rbr_identity``)."""
        return block_key(self.prefix, self.layout.modules[role])


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
                blocks[prefix] = Block(prefix, {}, deployed, layout)
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
