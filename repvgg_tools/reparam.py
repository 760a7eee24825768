"""``reparameterize``: turn any model into its plain form (blocks' own methods, Conv->BN folds, the graph fuser)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter

import torch
from torch import nn

from .blocks import conv_bn_kernel_bias
from .fx.check import float64_modules
from .fx.fuser import VERIFY_RTOL, FuseReport, example_inputs_for, graph_fuse
from .fx.trace import FusionTracer
from .io.errors import one_line
from .verify import compare_outputs

__all__ = ["reparameterize", "fold_conv_bn", "call_deploy_methods", "METHOD_NAMES"]

log = logging.getLogger(__name__)

# ids of the modules whose own ``reparameterize()`` is running: a block (or a user's model) whose method calls
# back into :func:`reparameterize` with itself must not be called again
_ACTIVE: set[int] = set()


METHOD_NAMES = ("reparameterize", "switch_to_deploy", "fuse")  # ours and timm; official, MMPretrain, YOLOv6; timm


def reparameterize(
    model: nn.Module, inplace: bool = False, *, methods: bool = True, graph: bool = True,
    example_inputs: tuple | None = None, report: bool = False,
) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Return the deploy form of ``model``: every re-parameterizable structure fused into plain convolutions.

    Three steps, each exact and each skipping what it cannot handle:

    1. Blocks' own conversion methods (``methods``): ``reparameterize()`` (ours, timm), ``switch_to_deploy()`` (the
       official RepVGG/DBB code, MMPretrain, YOLOv6) or ``fuse()`` (timm's RepViT/EfficientViT: a returned module
       replaces the block), called top-down on the first module of a branch that has one and takes no required
       argument; its children are then left to it. Modules of torch itself are never called. Each method runs on
       a float64 copy of its block, and the result is checked against the block in float64 on a small input (the
       block's input shape comes from one forward of ``example_inputs``): a method that raises or whose result does
       not reproduce the block is undone (the block stays exactly as it was, for steps 2 and 3; its children's
       methods are tried), and the report says why.
    2. Conv2d->BatchNorm2d folding: inside an ``nn.Sequential`` the BN entry is removed (index-named entries are
       renumbered, so ``vgg16_bn`` becomes exactly the ``vgg16`` layout); elsewhere pairs found by tracing with
       ``torch.fx`` fold and the BN becomes ``nn.Identity`` (only a BN that nothing else reads).
    3. The graph fuser (``graph``, :func:`repvgg_tools.fx.fuser.graph_fuse`): every remaining linear sub-graph
       (branch sums, BN-only and identity branches, 1x1->kxk chains, average pools, layer scales...) becomes the
       single conv it equals, each checked in float64 before it is swapped in; blocks without any method fuse too.

    Idempotent; works in any dtype and on any device.

    Args:
        model: the training-form model. BatchNorm running statistics are used, as in eval mode.
        inplace: modify ``model`` itself instead of a deep copy (a model whose own ``forward`` holds a fused
            sub-graph is returned as a new GraphModule even then).
        methods: call the blocks' own methods first (``False``: the graph fuser alone).
        graph: run the graph fuser.
        example_inputs: inputs of one forward call for the graph fuser (default: a 64x64 image sized from the first
            Conv2d).
        report: also return the graph fuser's :class:`~repvgg_tools.fx.fuser.FuseReport` (with the methods used
            and undone).

    Returns:
        The re-parameterized model (``model`` itself when ``inplace``, unless replaced), or ``(model, report)``.
    """
    if model.training:
        log.warning(
            "model is in train mode: converting with BatchNorm running statistics; call .eval() before comparing "
            "outputs, since train-mode BatchNorm uses batch statistics"
        )
    if not inplace:
        model = copy.deepcopy(model)
    method_report = FuseReport()
    blocks = call_deploy_methods(model, example_inputs, report=method_report) if methods else 0
    folded = fold_conv_bn(model)
    fuse_report = FuseReport()
    if graph:
        model, fuse_report = graph_fuse(model, example_inputs, inplace=True)
    fuse_report.methods, fuse_report.undone = method_report.methods, method_report.undone
    log.info("reparameterized %d blocks by their methods, folded %d Conv2d->BatchNorm2d pairs, fused %d sub-graphs",
             blocks, folded, len(fuse_report.fused))
    return (model, fuse_report) if report else model


def _deploy_method(module: nn.Module):
    """The first of :data:`METHOD_NAMES` that ``module`` defines outside torch and can call without arguments."""
    if type(module).__module__.startswith("torch."):
        return None, None
    for name in METHOD_NAMES:
        method = getattr(module, name, None)
        if not callable(method) or isinstance(method, nn.Module):
            continue
        try:
            params = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            continue
        if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in params):
            log.debug("%s.%s takes required arguments: not called", type(module).__name__, name)
            continue
        return name, method
    return None, None


def call_deploy_methods(model: nn.Module, example_inputs: tuple | None = None, *, report: FuseReport | None = None,
                        verify: bool = True) -> int:
    """Call the blocks' own deploy methods (see :func:`reparameterize`), top-down; only checked results change
    ``model`` (in place).

    Each method runs on a copy of its block (in float64 when ``verify``); the copy replaces the block's contents
    (the block object stays, so references to it stay valid) once its output matches the original block's in
    float64 on a small random input shaped like the block's input in one forward of ``example_inputs`` (default:
    the 64x64 image of :func:`~repvgg_tools.fx.fuser.example_inputs_for`). A method that raises, or whose result
    does not match, is undone: the block is left exactly as it was and its children's methods are tried instead.
    A block the example forward does not reach (or a model that does not run on it) takes its method's result
    unchecked, as long as the method does not raise.

    Args:
        model: the model, changed in place.
        example_inputs: positional inputs of one forward call (for the blocks' input shapes).
        report: a :class:`~repvgg_tools.fx.fuser.FuseReport` whose ``methods`` and ``undone`` lists are filled.
        verify: check each method's result (``False``: only a method that raises is undone).

    Returns:
        The number of methods used on modules not already deployed.
    """
    report = report if report is not None else FuseReport()
    found = {id(m): _deploy_method(m)[0] for m in model.modules() if id(m) not in _ACTIVE}
    found = {k: v for k, v in found.items() if v is not None}
    meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    inputs = _block_inputs(model, example_inputs, found) if verify and found and not meta else {}
    called = 0

    def visit(module: nn.Module, parent: nn.Module | None, attr: str, path: str) -> None:
        nonlocal called
        name = found.get(id(module))
        if name is not None:
            deployed = getattr(module, "is_deployed", False)
            outcome = _try_method(module, name, inputs.get(id(module)), replace=parent is not None, verify=verify)
            if outcome[0] is not None:
                new, how = outcome
                if new is not module:
                    setattr(parent, attr, new)  # timm's convention: fuse() returns the replacement
                called += not deployed
                report.methods.append((path, name, how))
                return
            report.undone.append((path, name, outcome[1]))
        for child_name, child in list(module.named_children()):
            visit(child, module, child_name, f"{path}.{child_name}" if path else child_name)

    undone_before = len(report.undone)
    visit(model, None, "", "")
    undone = report.undone[undone_before:]
    if undone:
        where, name, why = undone[0]
        log.warning("%d block method(s) undone (first: %s.%s(): %s): those blocks are left to Conv->BN folding and "
                    "the graph fuser; the report lists them", len(undone), where or type(model).__name__, name, why)
    return called


def _block_inputs(model: nn.Module, example_inputs: tuple | None, found: dict) -> dict:
    """The first call arguments of each module in ``found`` (by id) in one eval-mode forward of the model."""
    if example_inputs is not None:
        candidates = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
    else:
        try:
            candidates = example_inputs_for(model)
        except Exception:  # noqa: BLE001 - no parameters to size an input from
            candidates = []
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (args, kwargs))

    modes = {m: m.training for m in model.modules()}
    errors = []
    try:
        for m in modes:
            m.training = False
        for inputs in candidates:
            seen.clear()
            handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modes if id(m) in found]
            try:
                with torch.no_grad():
                    model(*inputs)
                return dict(seen)
            except Exception as exc:  # noqa: BLE001 - a model that needs other inputs: try the next, then say so
                errors.append(one_line(exc))
            finally:
                for h in handles:
                    h.remove()
    finally:
        for m, mode in modes.items():
            m.training = mode
    log.warning("the model did not run on an example input (%s): blocks' methods are used unchecked; pass "
                "example_inputs", "; ".join(errors) or "no Conv2d or Linear to size one from")
    return {}


def _check_inputs(module: nn.Module, captured: tuple):
    """Random float64 inputs shaped like ``captured`` (batch 1): cropped to a few pixels more than twice the block's
    largest kernel extent, then (made only if the crop does not run) at full size, for blocks that need it."""
    extent = max([(k - 1) * d + 1 for m in module.modules() if isinstance(m, nn.Conv2d)
                  for k, d in zip(m.kernel_size, m.dilation, strict=True)] or [1])
    args, kwargs = captured
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    crop = max(8, 2 * extent + 4)
    sizes = [crop] + ([None] if any(t.dim() == 4 and max(t.shape[2:]) > crop for t in tensors) else [])
    for size in sizes:
        gen = torch.Generator().manual_seed(0)

        def fresh(t, size=size, gen=gen):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return t
            shape = list(t.shape)
            shape[:1] = [1] if shape else []
            if size is not None and len(shape) == 4:
                shape[2:] = [min(s, size) for s in shape[2:]]
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(t.device)

        yield tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


@torch.no_grad()
def _run64(module: nn.Module, args: tuple, kwargs: dict):
    """``module``'s output in float64 and eval mode (its tensors and training flags are put back after)."""
    modes = {m: m.training for m in module.modules()}
    try:
        for m in modes:
            m.training = False
        with float64_modules([module]):
            return module(*args, **kwargs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _floating_dtypes(module: nn.Module) -> tuple[dict, torch.dtype | None]:
    dtypes = {name: t.dtype for name, t in (*module.named_parameters(), *module.named_buffers())
              if t is not None and t.is_floating_point()}
    return dtypes, next(iter(dtypes.values()), None)


@torch.no_grad()
def _cast_back(module: nn.Module, dtypes: dict, default: torch.dtype) -> None:
    """Give ``module``'s floating-point tensors their dtypes before the float64 trial (new ones: ``default``)."""
    memo: dict = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for store in (sub._parameters, sub._buffers):
            for key, t in list(store.items()):
                if t is None or not t.is_floating_point():
                    continue
                target = dtypes.get(f"{prefix}.{key}" if prefix else key, default)
                if t.dtype == target:
                    continue
                if id(t) not in memo:
                    cast = t.detach().to(target)
                    memo[id(t)] = nn.Parameter(cast, t.requires_grad) if isinstance(t, nn.Parameter) else cast
                store[key] = memo[id(t)]


def _try_method(module: nn.Module, name: str, captured: tuple | None, *, replace: bool, verify: bool):
    """Run ``module.<name>()`` on a copy and check the result; ``(module to use, how)`` or ``(None, why not)``.

    The module to use is ``module`` itself with the copy's contents moved in, or (``fuse()`` returning another
    module, when ``replace``) that module."""
    dtypes, dtype = _floating_dtypes(module)
    reference = inputs = None
    why_unchecked = "not checked: the example forward does not reach it"
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        why_unchecked = "not checked: meta tensors hold no values"
    elif verify and captured is not None and dtype is not None:
        why_unchecked = "not checked: it does not run in float64"
        for args, kwargs in _check_inputs(module, captured):
            try:
                reference, inputs = _run64(module, args, kwargs), (args, kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - try the full size, else use the method unchecked
                why_unchecked = f"not checked: it does not run in float64 ({one_line(exc)[:120]})"
    trial = copy.deepcopy(module)
    if reference is not None:
        trial.double()  # the method computes its kernel in float64; rounded once to the model's dtype below
    _ACTIVE.add(id(trial))
    try:
        result = getattr(trial, name)()
    except Exception as exc:  # noqa: BLE001 - published methods fail in many ways: the block stays as it was
        return None, f"raised {type(exc).__name__}: {one_line(exc)[:200]}"
    finally:
        _ACTIVE.discard(id(trial))
    new = result if replace and name == "fuse" and isinstance(result, nn.Module) and result is not trial else trial
    how = why_unchecked
    if reference is not None:
        try:
            err = compare_outputs(_run64(new, *inputs), reference)[1]
        except Exception as exc:  # noqa: BLE001 - its result does not run: refuse it
            return None, f"its result does not run ({type(exc).__name__}: {one_line(exc)[:160]})"
        rtol = max(VERIFY_RTOL, 10 * torch.finfo(dtype).eps)
        if not err <= rtol:
            return None, f"did not verify: rel err {err:.1e} > {rtol:.0e} in float64"
        how = f"checked in float64, rel err {err:.1e}"
        _cast_back(new, dtypes, dtype)
    if new is not trial:
        return new, how
    if type(trial) is not type(module):
        module.__class__ = type(trial)
    module.__dict__.clear()
    module.__dict__.update(trial.__dict__)  # the block object stays (references to it too), with the new contents
    return module, how


@torch.no_grad()
def _fuse_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    kernel, bias = conv_bn_kernel_bias(conv, bn)
    conv.weight.copy_(kernel)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias)
    else:
        conv.bias.copy_(bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
        and bn.num_features == conv.out_channels
    )


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv, in place.

    Returns:
        The number of folded pairs.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        items = list(seq._modules.items())
        kept, i = [], 0
        while i < len(items):
            kept.append(items[i])
            if i + 1 < len(items) and _foldable(items[i][1], items[i + 1][1]):
                _fuse_into_conv(items[i][1], items[i + 1][1])
                folded += 1
                i += 1
            i += 1
        if len(kept) != len(items):
            numbered = all(name.isdigit() for name, _ in items)
            for name, _ in items:
                del seq._modules[name]
            for j, (name, module) in enumerate(kept):
                seq.add_module(str(j) if numbered else name, module)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        folded += _fold_traced(model)
    return folded


def _fold_traced(model: nn.Module) -> int:
    """Fold the Conv2d->BatchNorm2d pairs that are not neighbours in a Sequential, found by tracing with torch.fx."""
    try:
        graph = FusionTracer().trace(model)  # convs and BatchNorms as leaves, parameters looked up once
    except Exception as exc:  # models with data-dependent control flow do not trace
        log.warning("could not trace %s (%s): BatchNorms outside nn.Sequential stay unfolded",
                    type(model).__name__, exc)
        return 0
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    # a BN whose tensors the code also reads (DBB pads with its shift) must stay a BN
    read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1 \
                or node.target in read:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if not _foldable(conv, bn):
            continue
        _fuse_into_conv(conv, bn)
        parent_name, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
        folded += 1
    return folded
