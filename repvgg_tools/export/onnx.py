"""ONNX export of deploy-form models: plain graph, simplified, checked, single file, verified on onnxruntime.

The exporter is ``torch.onnx.export(..., dynamo=False)``: on a deploy-form RepVGG it writes exactly Conv, Relu,
GlobalAveragePool, Flatten and Gemm in a fraction of a second. (torch's dynamo exporter needs the ``onnxscript``
package, takes seconds even on a tiny model and writes ReduceMean/Reshape for the head.)
"""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.checkpoint import atomic_write
from ..io.errors import one_line
from .metrics import check_metrics, max_activation, output_metrics
from .precision import PrecisionError

__all__ = [
    "PLAIN_OPS", "MAX_PROTO_BYTES", "ExportError", "export_onnx", "simplify", "drop_identity_pools", "op_counts",
    "save_onnx", "onnx_session", "run_onnx", "verify_onnx", "torch_outputs", "model_io",
]

log = logging.getLogger(__name__)

PLAIN_OPS = frozenset({"Conv", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"})
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file model


class ExportError(ValueError):
    """The model cannot be exported or saved as asked; the message says why in one line."""


def export_onnx(
    model: nn.Module, input_size: int | Sequence[int] = 224, *, batch: int = 1, dynamic_batch: bool = True,
    opset: int = 18, in_chans: int = 3, input_name: str = "input", output_names: Sequence[str] | None = None,
    simplify_graph: bool = True,
) -> Any:
    """Export ``model`` (already in deploy form) to an fp32 ``onnx.ModelProto`` that passes ``onnx.checker``.

    Args:
        model: the module; put in eval mode, run on CPU in float32.
        input_size: side (or ``(H, W)``) of the input.
        batch: batch size of the example input (the fixed batch with ``dynamic_batch=False``).
        dynamic_batch: make the first axis of every input/output symbolic (``batch``).
        opset: ONNX opset.
        in_chans: input channels.
        input_name: name of the graph input.
        output_names: names of the outputs (default ``logits``; ``feat0..`` for a list output).
        simplify_graph: run onnxslim (and onnxsim when installed) and drop identity pools.

    Raises:
        ExportError: the exporter fails, or the model is over protobuf's 2 GB single-file limit.
    """
    import onnx

    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if batch < 1 or h < 1 or w < 1:
        raise ExportError(f"batch and input size must be positive, got batch {batch}, size {h}x{w}")
    model = model.eval().float().cpu()
    x = torch.randn(batch, in_chans, h, w)
    if output_names is None:
        with torch.no_grad():
            out = model(x)
        count = len(out) if isinstance(out, (list, tuple)) else 1
        single = count == 1 and isinstance(out, torch.Tensor)
        output_names = ["logits"] if single else [f"feat{i}" for i in range(count)]
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    if param_bytes > MAX_PROTO_BYTES:
        raise ExportError(f"the model has {param_bytes / 2**30:.1f} GiB of fp32 weights, over protobuf's 2 GB "
                          "single-file limit, which this exporter does not support")
    dynamic_axes = {name: {0: "batch"} for name in [input_name, *output_names]} if dynamic_batch else None
    buf = io.BytesIO()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True)
        except Exception as exc:  # the exporter raises many types; report one line
            raise ExportError(f"torch.onnx.export failed: {one_line(exc)}") from None
    proto = onnx.load_from_string(buf.getvalue())
    del buf
    log.info("exported in %.2f s: %s", time.perf_counter() - start, dict(op_counts(proto)))
    if simplify_graph:
        proto = simplify(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {one_line(exc)}") from None
    return proto


def simplify(model: Any) -> Any:
    """Drop identity pools, then simplify with onnxsim when installed and onnxslim (constant folding, dead code).

    A simplifier that fails leaves the model as it was (logged as a warning).
    """
    model = drop_identity_pools(model)
    try:
        import onnxsim
    except ImportError:
        onnxsim = None
    if onnxsim is not None:
        try:
            simplified, ok = onnxsim.simplify(model)
            if ok:
                model = simplified
        except Exception as exc:  # onnxsim raises plain RuntimeErrors from C++
            log.warning("onnxsim failed (%s); keeping the unsimplified graph", one_line(exc))
    try:
        import onnxslim

        model = onnxslim.slim(model)
    except ImportError:
        log.warning("onnxslim is not installed: the graph is not simplified")
    except Exception as exc:
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", one_line(exc))
    return model


def drop_identity_pools(model: Any) -> Any:
    """Remove pooling nodes that copy their input (1x1 kernel, stride 1, no padding), in place; returns ``model``.

    VGG's adaptive 7x7 average pool exports as such a node at 224x224.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type not in ("AveragePool", "MaxPool") or len(node.output) != 1 or node.output[0] in outputs:
            continue
        attrs = {a.name: list(a.ints) for a in node.attribute}
        if (all(k == 1 for k in attrs.get("kernel_shape", [0])) and all(s == 1 for s in attrs.get("strides", [1]))
                and all(p == 0 for p in attrs.get("pads", [0])) and all(d == 1 for d in attrs.get("dilations", [1]))):
            src, dst = node.input[0], node.output[0]
            for other in graph.node:
                for i, name in enumerate(other.input):
                    if name == dst:
                        other.input[i] = src
            graph.node.remove(node)
    return model


def op_counts(model: Any) -> Counter:
    """Node count per op type of the main graph."""
    return Counter(n.op_type for n in model.graph.node)


def model_io(model: Any) -> dict:
    """Names, element types and shapes (symbolic axes as names) of a model's inputs and outputs."""
    from onnx import helper

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": shape})
        return out

    init = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in init]),
            "outputs": describe(model.graph.output)}


def save_onnx(model: Any, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``model`` as one file, atomically (never over an existing file unless ``force``).

    Raises:
        ExportError: the model is over 2 GB.
        CheckpointError: ``path`` exists without ``force``, or its directory is missing.
    """
    size = model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ExportError(f"{path}: the model is {size / 2**30:.1f} GiB, over protobuf's 2 GB single-file limit")
    data = model.SerializeToString()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write, force=force)


def onnx_session(model: Any, threads: int | None = None, exact_qdq: bool = False) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for a ``ModelProto``, serialized bytes or a path.

    Args:
        model: the model.
        threads: intra-op threads (default: onnxruntime's).
        exact_qdq: basic graph optimizations only, so Q/DQ nodes run as written (float math on quantized values)
            instead of being fused into onnxruntime's int8 kernels. Those kernels saturate on x86 CPUs without
            VNNI (AVX2, AVX-512F) when weights use the full int8 range, which is what TensorRT wants.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    source = model if isinstance(model, (str, os.PathLike, bytes)) else model.SerializeToString()
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Outputs of an onnxruntime session for one input batch (cast to the input's declared dtype)."""
    inp = session.get_inputs()[0]
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return session.run(None, {inp.name: arr.astype(dtype, copy=False)})


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[list[np.ndarray]]:
    """Float64 numpy outputs of a PyTorch model (eval mode, fp32) for each input batch."""
    model = model.eval()
    result = []
    for x in inputs:
        out = model(x.float())
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        result.append([o.double().numpy() for o in outs])
    return result


@torch.no_grad()
def verify_onnx(session: Any, reference: nn.Module, precision: str, inputs: Sequence[torch.Tensor],
                reference_outputs: Sequence[Sequence[np.ndarray]] | None = None) -> dict:
    """Compare an onnxruntime session with the PyTorch model on ``inputs`` (batches), per :func:`check_metrics`.

    For fp16 the PyTorch model's largest activation is checked too: onnxruntime CPU computes many fp16 operators in
    fp32, so an overflow would otherwise go unnoticed until the model runs on a GPU.

    Args:
        session: onnxruntime session.
        reference: the PyTorch model.
        precision: ``fp32``, ``fp16`` or ``int8`` (the contract to check).
        inputs: input batches.
        reference_outputs: :func:`torch_outputs` of ``reference`` on ``inputs``, if already computed.

    Returns:
        The metrics of :func:`~repvgg_tools.export.metrics.output_metrics` over all batches, plus ``passed``,
        ``summary`` (one line), ``precision`` and ``seconds``.
    """
    start = time.perf_counter()
    ref = list(reference_outputs) if reference_outputs is not None else torch_outputs(reference, inputs)
    cand = [run_onnx(session, x) for x in inputs]
    if any(len(c) != len(r) for c, r in zip(cand, ref, strict=True)):
        raise PrecisionError(f"the ONNX model has {len(cand[0])} outputs, PyTorch {len(ref[0])}")
    cat = [np.concatenate([c[i] for c in cand]) for i in range(len(cand[0]))]
    rcat = [np.concatenate([r[i] for r in ref]) for i in range(len(ref[0]))]
    metrics = output_metrics(cat, rcat)
    if precision == "fp16":
        metrics["max_activation"] = max_activation(reference, inputs)
    passed, summary = check_metrics(metrics, precision)
    metrics.update(passed=passed, summary=summary, precision=precision, seconds=time.perf_counter() - start)
    log.info("onnxruntime vs PyTorch (%s): %s", precision, summary)
    return metrics


