"""The graph fuser's one-trace pipeline: the model is read where it is and never changed, each rewritten module is
cut out of its ancestor's trace (or, where that cannot be, its parent is rewritten), the planner's incremental
passes agree with full ones, and the checks' float64 conv agrees with torch's.
"""

from __future__ import annotations

import itertools

import fuser_zoo_blocks as zoo
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg_tools import randomize_batchnorm
from repvgg_tools.fx import match as graph_match
from repvgg_tools.fx import plan as graph_plan
from repvgg_tools.fx.check import float64_modules, grouped_conv2d
from repvgg_tools.fx.fuser import graph_fuse
from repvgg_tools.fx.trace import FusionTracer, Traced, run_for_shapes
from repvgg_tools.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _convs_and_bns(model: nn.Module) -> tuple[int, int]:
    return (sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = zoo.RepVGG(3, 8, 2)
        self.body = nn.Sequential(zoo.MobileOne(8, 8), zoo.RepMixer(8), zoo.DBB(8, 8))
        self.sub = nn.Module()
        self.sub.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.sub.drop(self.body(self.stem(x))).mean((2, 3))


def _snapshot(model: nn.Module) -> dict:
    return {name: (t, t.dtype, t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("training", [False, True])
def test_the_input_model_is_read_never_changed(training):
    """Analysis runs on the caller's model (float64 tensors swapped in for the checks, eval mode): afterwards it
    holds the very same tensor objects with the same dtypes and values, the same modules and training flags, and
    the fused copy shares no storage with it."""
    model = randomize_batchnorm(Net(), seed=3).train(training)
    model.body[1].train(not training)  # a mixed model: every flag must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    before = _snapshot(model)
    fused, report = graph_fuse(model, (torch.randn(1, 3, 12, 12),))
    assert report.fused and type(fused) is Net
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for name, (t, dtype, value) in before.items():
        assert after[name][0] is t and t.dtype == dtype and torch.equal(t, value), name
    assert dict(model.named_modules()) == modules
    assert {name: m.training for name, m in model.named_modules()} == flags
    ours = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not ours & {t.untyped_storage().data_ptr() for t in [*fused.parameters(), *fused.buffers()]}
    assert fused.training is training and all(m.training is training for n, m in fused.named_modules()
                                              if "fused_" in n)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert compare_outputs(fused.eval()(x), model.eval()(x))[1] <= 1e-5
    assert _convs_and_bns(fused) == (5, 0)  # stem, MobileOne (depthwise + pointwise), RepMixer, DBB


class CalledTwice(nn.Module):
    """One block instance called twice: its calls have no single region, so its parent is rewritten instead."""

    def __init__(self) -> None:
        super().__init__()
        self.block = zoo.RepVGG(4, 4)
        self.other = zoo.RepVGG(4, 4)

    def forward(self, x):
        return self.other(self.block(self.block(x)))

    def extra(self) -> str:
        return "kept"


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = CalledTwice()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.inner(x))


class ConstantArg(nn.Module):
    """A block called with a non-default constant: the trace bakes it in, so the block's own forward is not the
    region's, and the parent is rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ScaledBlock()

    def forward(self, x):
        return self.block(x, 3.0)


class ScaledBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale: float = 1.0):
        return torch.relu(self.bn(self.conv(x)) * scale)


@pytest.mark.parametrize("inplace", [False, True])
def test_modules_that_cannot_be_cut_out_rewrite_their_parent(inplace):
    model = randomize_batchnorm(Wrapper(), seed=8).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = model(x)
    fused, report = graph_fuse(model, (x[:1],), inplace=inplace)
    assert type(fused) is Wrapper and isinstance(fused.inner, torch.fx.GraphModule)
    assert {f.module for f in report.fused} == {"inner"}
    assert _convs_and_bns(fused) == (3, 0)  # the shared block's conv (used twice), the other block, the head
    assert len(report.fused) == 3
    with torch.no_grad():
        assert compare_outputs(fused(x), ref)[1] <= 1e-5

    model = randomize_batchnorm(ConstantArg(), seed=9).eval()
    with torch.no_grad():
        ref = model(x)
    fused, report = graph_fuse(model, (x[:1],), inplace=inplace)
    assert [f.module for f in report.fused] == [""] and _convs_and_bns(fused) == (1, 0)
    with torch.no_grad():
        assert compare_outputs(fused(x), ref)[1] <= 1e-5


def test_a_module_cut_out_keeps_its_signature_and_defaults():
    model = randomize_batchnorm(nn.Sequential(ScaledBlock(), nn.Identity()), seed=2).eval()
    fused, report = graph_fuse(model, (torch.randn(1, 4, 6, 6),))
    block = fused[0]
    assert isinstance(block, torch.fx.GraphModule) and [f.module for f in report.fused] == ["0"]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert compare_outputs(block(x), model[0](x))[1] <= 1e-5  # the default scale
        assert compare_outputs(block(x, 1.0), model[0](x, 1.0))[1] <= 1e-5


@pytest.mark.parametrize("name", ["Net", "FastViTLike"])
def test_incremental_planning_passes_equal_full_ones(name, monkeypatch):
    """The planner reuses the maps of nodes whose inputs gained no cut; recomputing everything in every pass must
    give the same sub-graphs, kernels and refusals."""
    if name == "Net":
        model = Net()
    else:  # a padded kxk after a 3x3 map and a merge that would cost more: both add cuts in later passes
        model = nn.Sequential(zoo.RepMixer(6), nn.Conv2d(6, 6, 7, padding=3, groups=6), nn.BatchNorm2d(6),
                              nn.Conv2d(6, 24, 1), zoo.LargeKernel(24))
    model = randomize_batchnorm(model, seed=4).eval()
    x = torch.randn(1, 3 if name == "Net" else 6, 12, 12)

    def plan_of(full: bool):
        graph = FusionTracer().trace(model)
        modules = dict(model.named_modules())
        with torch.no_grad():
            run_for_shapes(model, graph, (x,), modules)
        traced = Traced(model, graph, {})
        if full:
            original = graph_match.Analysis.maps
            monkeypatch.setattr(graph_match.Analysis, "maps", lambda self, cuts, *a: original(self, cuts))
        try:
            found = graph_plan.plan(traced, modules=modules)
        finally:
            monkeypatch.undo()
        outputs = {n.name: (sorted(x.name for x in m.nodes), m.kernel.to(F64), m.bias)
                   for n, m in found.outputs.items()}
        return outputs, {n.name: why for n, why in found.refusals.items()}

    (fast, fast_why), (full, full_why) = plan_of(False), plan_of(True)
    assert fast.keys() == full.keys() and fast_why == full_why
    assert name == "Net" or fast_why  # the second model does cut
    for key in fast:
        assert fast[key][0] == full[key][0]
        assert torch.equal(fast[key][1], full[key][1]) and torch.equal(fast[key][2], full[key][2])


def test_grouped_conv2d_is_torch_conv2d():
    """The checks' float64 conv (unfold + batched matmul for small grouped outputs, F.conv2d otherwise) against
    torch's own, on both sides of its switch (5x7 inputs take the unfold path, 40x42 the F.conv2d one)."""
    gen = torch.Generator().manual_seed(0)
    cases = itertools.product([1, 2, 6], [1, 2], [0, 1, 3], [1, 2], [(1, 1), (3, 3), (1, 3), (7, 7)], [1, 2], [5, 40])
    tried = 0
    for groups, stride, padding, dilation, kernel, c_in_group, size in cases:
        if size + 2 * padding - dilation * (kernel[0] - 1) - 1 < 0:
            continue
        x = torch.randn(2, groups * c_in_group, size, size + 2, generator=gen, dtype=F64)
        w = torch.randn(groups * 3, c_in_group, *kernel, generator=gen, dtype=F64)
        for b in (torch.randn(groups * 3, generator=gen, dtype=F64), None):
            ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
            out = grouped_conv2d(x, w, b, stride, padding, dilation, groups)
            case = (groups, stride, padding, dilation, kernel, c_in_group, size, b is None)
            assert out.shape == ref.shape, case
            assert (out - ref).abs().max() <= 1e-12 * ref.abs().max(), case
            tried += 1
    assert tried > 500


def test_float64_modules_puts_back_the_same_tensors():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1).half())
    shared = model[0]
    before = [(m, name, t) for m in model.modules() for name, t in [*m._parameters.items(), *m._buffers.items()]]
    with float64_modules([model[0], model[1], model[2], shared]):
        for m, name, t in before:
            now = getattr(m, name)
            assert (now is not t and now.dtype == F64) if t.is_floating_point() else now is t
            assert not isinstance(t, nn.Parameter) or isinstance(now, nn.Parameter)
        x = torch.randn(1, 2, 5, 5, dtype=F64)
        assert model(x).dtype == F64
    for m, name, t in before:
        assert getattr(m, name) is t
    assert model[2].weight.dtype == torch.float16 and model[1].num_batches_tracked.dtype == torch.long


def test_a_wrong_example_input_is_still_refused():
    """Shape propagation skips the convs' arithmetic, not their input checks: an input with the wrong channel
    count fails (and the next candidate is tried), as the real forward would."""
    model = randomize_batchnorm(zoo.RepVGG(4, 4), seed=1).eval()
    fused, report = graph_fuse(model, (torch.randn(1, 3, 8, 8),))
    assert not report.fused and report.skipped == [("<model>", "no example input: pass example_inputs")]
    fused, report = graph_fuse(model)  # sized from the first conv: 4 channels
    assert len(report.fused) == 1 and _convs_and_bns(fused) == (1, 0)


class MadeConstant(nn.Module):
    """A layer scale the forward creates: fx stores such tensors as constants of the traced root."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) * torch.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1))


@pytest.mark.parametrize("whole_model", [False, True])
def test_constants_a_forward_creates_stay_off_the_input_model(whole_model):
    model = randomize_batchnorm(nn.Sequential(MadeConstant(), MadeConstant()), seed=5).eval()
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    x = torch.randn(2, 4, 7, 7)
    fused, report = graph_fuse(model, (x[:1],), whole_model=whole_model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    assert len(report.fused) == 2 and _convs_and_bns(fused) == (2, 0)
    if whole_model:
        assert isinstance(fused, torch.fx.GraphModule)
    else:  # each block cut out of the one trace, its constant taken along
        assert type(fused) is nn.Sequential and sorted(f.module for f in report.fused) == ["0", "1"]
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5


class BlurringBN(nn.BatchNorm2d):
    """Looks like a plain BN to the analysis (no children) but also blurs: a spatial op inside a pointwise map."""

    def forward(self, x):
        return F.avg_pool2d(super().forward(x), 3, 1, 1, count_include_pad=False)


def test_a_spatial_op_hidden_in_a_pointwise_map_fails_its_check():
    """Pointwise maps are checked on a 3x3 crop (channel mixing only); that still sees a border and a centre, so a
    spatial op the analysis missed is caught and left unfused."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 8, 1), BlurringBN(8), nn.ReLU()), seed=2).eval()
    x = torch.randn(2, 8, 9, 9)
    fused, report = graph_fuse(model, (x[:1],))
    assert not report.fused and any("float64 check" in why for _, why in report.unfused), str(report)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


class StemNet(nn.Module):
    """conv -> BN in the model's own forward (ResNet's stem), a conv -> BN -> act module, and a BN read elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), BNAct(8))
        self.tail = Tail()

    def forward(self, x):
        return self.tail(self.body(torch.relu(self.bn1(self.conv1(x)))))


class Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn.bias.reshape(1, -1, 1, 1)  # the BN's tensor read elsewhere


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BN subclass that applies its own activation child."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_bn_chains_are_swapped_module_for_module(inplace):
    """A plain chain keeps the model's class and names, even in the model's own forward: the fused conv takes the
    conv's place, the BN becomes Identity (or its own activation); a BN whose tensors the forward also reads is not
    a plain chain, and its module's forward is rewritten instead."""
    model = randomize_batchnorm(StemNet(), seed=4).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    fused, report = graph_fuse(model, (x[:1],), inplace=inplace)
    assert type(fused) is StemNet and (fused is model) is inplace
    assert isinstance(fused.conv1, nn.Conv2d) and fused.conv1.bias is not None and isinstance(fused.bn1, nn.Identity)
    assert isinstance(fused.body[0], nn.Conv2d) and type(fused.body[1]) is nn.ReLU
    assert {"conv1.weight", "conv1.bias", "body.0.weight", "body.0.bias"} <= set(fused.state_dict())
    assert isinstance(fused.tail, torch.fx.GraphModule)  # its BN's bias is read by the forward: not a plain chain
    assert len(report.fused) == 3 and _convs_and_bns(fused) == (3, 0)
    assert sorted(f.module for f in report.fused) == ["", "body", "tail"]
    with torch.no_grad():
        assert compare_outputs(fused(x), ref)[1] <= 1e-5


class DistilledHead(nn.Module):
    """RepViT's head: two BN1d -> Linear heads averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 5))
        self.dist = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 5))

    def forward(self, x):
        return (self.head(x) + self.dist(x)) / 2


class DropThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.drop = nn.Dropout(0.2)
        self.head = DistilledHead()

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x)).mean((2, 3))))


def test_an_identity_op_before_a_module_does_not_pull_its_rewrite_up():
    """The parent's eval Dropout belongs to the sub-graph (it is an identity) but needs no rewrite: the head alone
    is rewritten, reading the Dropout's output, and the model keeps its class."""
    model = randomize_batchnorm(DropThenHead(), seed=6).eval()
    x = torch.randn(3, 3, 9, 9)
    fused, report = graph_fuse(model, (x[:1],))
    assert type(fused) is DropThenHead and isinstance(fused.head, torch.fx.GraphModule)
    assert [f.module for f in report.fused] == ["head"] and _convs_and_bns(fused) == (1, 0)
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5
