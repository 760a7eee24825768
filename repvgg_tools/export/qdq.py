"""TensorRT-style explicit quantization of an fp32 ONNX graph: calibration, Q/DQ insertion and a placement checker.

TensorRT's explicit-quantization rules (docs/deploy.md), which :func:`insert_qdq` follows and
:func:`check_tensorrt_qdq` checks:

- int8, symmetric (zero point 0) everywhere;
- weights of Conv and Gemm stored as int8 initializers behind a ``DequantizeLinear`` with one scale per output
  channel (Conv axis 0; Gemm axis 0 with ``transB=1``, else 1); biases stay float (TensorRT refuses int32 DQ);
- activations quantized per tensor, by a ``QuantizeLinear -> DequantizeLinear`` pair at input 0 of every Conv/Gemm;
- no Q/DQ on Conv/Gemm outputs, so TensorRT fuses Conv+bias+ReLU and the graph outputs (logits, feature maps) leave
  in float.

Calibration collects, on the fp32 graph run by onnxruntime, the absolute values reaching each Conv/Gemm input and
turns them into a threshold (the float value mapped to 127): ``minmax`` (the largest), ``percentile`` (99.99th
percentile of |x|) or ``entropy`` (TensorRT's KL-divergence search over a 2048-bin histogram of |x|).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .precision import PrecisionError

__all__ = [
    "CALIBRATION_METHODS", "QUANTIZED_OPS", "calibration_tensors", "calibrate_thresholds", "insert_qdq",
    "weight_axis", "check_tensorrt_qdq",
]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm")
PERCENTILE = 99.99
HIST_BINS = 2048
ENTROPY_LEVELS = 128  # TensorRT's entropy calibration: 128 positive int8 levels


def calibration_tensors(model: Any) -> list[str]:
    """Names of the activations to quantize: input 0 of every Conv and Gemm, in graph order, each once."""
    inits = {i.name for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and node.input[0] not in inits and node.input[0] not in names:
            names.append(node.input[0])
    return names


def _activation_session(model: Any, names: Sequence[str]) -> Any:
    """An onnxruntime session of ``model`` that also outputs the tensors ``names``."""
    import onnx

    from .onnx import onnx_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return onnx_session(probe)


def calibrate_thresholds(model: Any, batches: Sequence[np.ndarray], method: str = "minmax") -> dict[str, float]:
    """Per-tensor thresholds (the float value mapped to int8 127) of every Conv/Gemm input on calibration batches.

    Args:
        model: fp32 ``onnx.ModelProto`` with one input.
        batches: input batches ``(n, C, H, W)`` float32, preprocessed like the model's inputs.
        method: ``minmax``, ``entropy`` or ``percentile``.

    Returns:
        ``{tensor name: threshold}``; a tensor that is zero on every image gets the threshold 1.0.

    Raises:
        PrecisionError: an unknown method, or no batches.
    """
    if method not in CALIBRATION_METHODS:
        raise PrecisionError(f"unknown calibration method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
    if not batches:
        raise PrecisionError("no calibration images")
    names = calibration_tensors(model)
    session = _activation_session(model, names)
    input_name = session.get_inputs()[0].name
    index = {o.name: i for i, o in enumerate(session.get_outputs())}

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        out = session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.abs(out[index[name]]) for name in names}

    amax = dict.fromkeys(names, 0.0)
    for batch in batches:
        for name, values in run(batch).items():
            amax[name] = max(amax[name], float(values.max()) if values.size else 0.0)
    if method != "minmax":
        hists = {name: np.zeros(HIST_BINS, dtype=np.int64) for name in names}
        for batch in batches:
            for name, values in run(batch).items():
                if amax[name] > 0:
                    hists[name] += np.histogram(values, bins=HIST_BINS, range=(0.0, amax[name]))[0]
        pick = _percentile_threshold if method == "percentile" else _entropy_threshold
        result = {name: pick(hists[name], amax[name]) if amax[name] > 0 else 0.0 for name in names}
    else:
        result = amax
    result = {name: (t if t > 0 and np.isfinite(t) else 1.0) for name, t in result.items()}
    log.info("calibrated %d tensors (%s) on %d batches", len(result), method, len(batches))
    return result


def _percentile_threshold(hist: np.ndarray, amax: float) -> float:
    """The upper edge of the bin holding the ``PERCENTILE``-th percentile of |x|."""
    cdf = np.cumsum(hist) / max(int(hist.sum()), 1)
    idx = int(np.searchsorted(cdf, PERCENTILE / 100.0))
    return amax * min(idx + 1, len(hist)) / len(hist)


def _entropy_threshold(hist: np.ndarray, amax: float) -> float:
    """TensorRT's entropy calibration: the clipping bin count ``i`` (>= 128) whose 128-level quantization of
    ``hist[:i]`` (outliers folded into the last bin) has the smallest KL divergence to it; returns its upper edge."""
    hist = hist.astype(np.float64)
    hist[0] = 0  # exact zeros (ReLU) are represented exactly at any threshold; they would dominate the search
    if hist.sum() == 0:
        return amax
    best_i, best_kl = len(hist), np.inf
    for i in range(ENTROPY_LEVELS, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        starts = np.linspace(0, i, ENTROPY_LEVELS + 1).astype(int)[:-1]  # i >= 128: no empty group
        sums, counts = np.add.reduceat(hist[:i], starts), np.add.reduceat(nonzero.astype(np.float64), starts)
        level = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        q = np.repeat(level, np.diff(np.append(starts, i))) * nonzero
        mask = p > 0
        if not (q[mask] > 0).all():
            continue
        p_n, q_n = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float((p_n * np.log(p_n / q_n)).sum())
        if kl < best_kl:
            best_i, best_kl = i, kl
    return amax * best_i / len(hist)


def weight_axis(node: Any) -> int:
    """The output-channel axis of a Conv or Gemm weight (Gemm: 0 with ``transB=1``, else 1)."""
    if node.op_type == "Conv":
        return 0
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if trans_b else 1


def insert_qdq(model: Any, thresholds: Mapping[str, float], *, per_channel: bool = True, reduce_range: bool = False,
               weight_scales: Mapping[str, np.ndarray] | None = None) -> Any:
    """A copy of an fp32 ``onnx.ModelProto`` with TensorRT-style int8 Q/DQ at every Conv/Gemm (see the module doc).

    Args:
        model: fp32 model (opset >= 13).
        thresholds: per-tensor activation thresholds (see :func:`calibrate_thresholds`) for every tensor of
            :func:`calibration_tensors`; scale = threshold / 127.
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights (|q| <= 63), for onnxruntime's fused CPU kernels on x86 without VNNI.
        weight_scales: scales to use for some weights, by initializer name (e.g. learned by quantization-aware
            training); the others get ``max|W| / 127`` per channel.

    Raises:
        PrecisionError: a threshold is missing or not positive, a weight is not a float initializer, or the opset
            is below 13.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise PrecisionError(f"int8 Q/DQ with per-channel scales needs opset >= 13, not {opset}")
    qmax = 63 if reduce_range else 127
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    new_inits, new_nodes = [], {}  # new_nodes: index of a Conv/Gemm -> the nodes to insert before it
    quantized_acts: dict[str, str] = {}
    for idx, node in enumerate(graph.node):
        if node.op_type not in QUANTIZED_OPS:
            continue
        before = []
        act = node.input[0]
        if act not in inits:
            if act not in quantized_acts:
                t = thresholds.get(act)
                if t is None or not np.isfinite(t) or t <= 0:
                    raise PrecisionError(f"no positive calibration threshold for {act!r}")
                scale, zero = f"{act}_scale", f"{act}_zero_point"
                new_inits += [numpy_helper.from_array(np.array(t / 127.0, np.float32), scale),
                              numpy_helper.from_array(np.array(0, np.int8), zero)]
                q, dq = f"{act}_QuantizeLinear_Output", f"{act}_DequantizeLinear_Output"
                before += [helper.make_node("QuantizeLinear", [act, scale, zero], [q], name=f"{act}_QuantizeLinear"),
                           helper.make_node("DequantizeLinear", [q, scale, zero], [dq],
                                            name=f"{act}_DequantizeLinear")]
                quantized_acts[act] = dq
            node.input[0] = quantized_acts[act]
        w_name = node.input[1]
        if w_name not in inits or inits[w_name].data_type != TensorProto.FLOAT:
            raise PrecisionError(f"{node.op_type} {node.name!r}: weight {w_name!r} is not a float initializer")
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
        axis = weight_axis(node)
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        if weight_scales is not None and w_name in weight_scales:
            scales = np.asarray(weight_scales[w_name], np.float64).reshape(-1)
        elif per_channel:
            scales = np.abs(moved).max(1) / qmax
        else:
            scales = np.full(w.shape[axis], np.abs(w).max() / qmax)
        scales = np.where(scales > 0, scales, 1.0)
        shape = [1] * w.ndim
        shape[axis] = -1
        q_w = np.clip(np.rint(w / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
        uniform = np.allclose(scales, scales[0]) and not per_channel
        s_arr = np.array(scales[0] if uniform else scales, np.float32)
        z_arr = np.zeros(s_arr.shape, np.int8)
        q_name, s_name, z_name = f"{w_name}_quantized", f"{w_name}_scale", f"{w_name}_zero_point"
        new_inits += [numpy_helper.from_array(q_w, q_name), numpy_helper.from_array(s_arr, s_name),
                      numpy_helper.from_array(z_arr, z_name)]
        w_out = f"{w_name}_DequantizeLinear_Output"
        before.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [w_out],
                                       name=f"{w_name}_DequantizeLinear", **({} if uniform else {"axis": axis})))
        node.input[1] = w_out
        graph.initializer.remove(inits.pop(w_name))
        new_nodes[idx] = before
    nodes = list(graph.node)
    del graph.node[:]
    for idx, node in enumerate(nodes):
        graph.node.extend(new_nodes.get(idx, []))
        graph.node.append(node)
    graph.initializer.extend(new_inits)
    onnx.checker.check_model(out)
    log.info("inserted Q/DQ at %d Conv/Gemm nodes (%d activations)", len(new_nodes), len(quantized_acts))
    return out


def check_tensorrt_qdq(model: Any) -> list[str]:
    """Problems with the Q/DQ placement of an int8 ONNX for TensorRT's explicit quantization (empty list: none).

    Checks that every Conv/Gemm takes its input 0 through a per-tensor ``QuantizeLinear -> DequantizeLinear`` pair
    and its weight through a per-output-channel ``DequantizeLinear`` of an int8 initializer, that biases stay float,
    that every quantization is int8 and symmetric with positive finite scales, that a Q/DQ pair shares its scale,
    that no Q/DQ sits on a Conv/Gemm output or feeds anything but a Conv/Gemm input 0 (stray), and that no graph
    output leaves through a ``DequantizeLinear``.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    problems: list[str] = []

    def arr(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def check_qparams(node, what: str, per_tensor: bool) -> None:
        scale = arr(node.input[1])
        zero = arr(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{what}: scale {node.input[1]!r} is not a constant")
            return
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            problems.append(f"{what}: scale is not positive and finite")
        if per_tensor and scale.size != 1:
            problems.append(f"{what}: activation quantized per channel ({scale.size} scales), not per tensor")
        if zero is None or inits[node.input[2]].data_type != TensorProto.INT8:
            problems.append(f"{what}: not int8 (zero point missing or of another type)")
        elif zero.any():
            problems.append(f"{what}: asymmetric (non-zero zero point)")

    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            problems.append(f"{label}: input {node.input[0]!r} is not quantized (no DequantizeLinear)")
        else:
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                problems.append(f"{label}: input DequantizeLinear is not fed by a QuantizeLinear")
            else:
                check_qparams(q, f"{label} input", per_tensor=True)
                check_qparams(dq, f"{label} input", per_tensor=True)
                same = all(arr(a) is not None and arr(b) is not None and np.array_equal(arr(a), arr(b))
                           for a, b in zip(q.input[1:3], dq.input[1:3], strict=False))
                if not same:
                    problems.append(f"{label}: input QuantizeLinear and DequantizeLinear differ in scale/zero point")
        wdq = producer.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear":
            problems.append(f"{label}: weight {node.input[1]!r} is not quantized (no DequantizeLinear)")
        else:
            w = inits.get(wdq.input[0])
            if w is None or w.data_type != TensorProto.INT8:
                problems.append(f"{label}: weight DequantizeLinear input is not an int8 initializer")
            else:
                check_qparams(wdq, f"{label} weight", per_tensor=False)
                axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
                scale = arr(wdq.input[1])
                want = weight_axis(node)
                if scale is not None and (scale.size != w.dims[want] or scale.ndim != 1 or axis % len(w.dims) != want):
                    problems.append(f"{label}: weight not quantized per output channel (axis {axis}, "
                                    f"{scale.size} scales for {w.dims[want]} channels)")
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in inits or inits[bias].data_type != TensorProto.FLOAT:
                problems.append(f"{label}: bias {bias!r} is not a float initializer (TensorRT refuses int32 DQ)")
        for out in node.output:  # allowed only where the consumer needs it: a Conv/Gemm reading the output
            for q, _ in consumers.get(out, []):
                if q.op_type != "QuantizeLinear":
                    continue
                readers = [c for d, _ in consumers.get(q.output[0], []) for c in consumers.get(d.output[0], [])]
                if any(c.op_type not in QUANTIZED_OPS or i != 0 for c, i in readers):
                    problems.append(f"{label}: output {out!r} is quantized before a float consumer (Q/DQ on a "
                                    "Conv/Gemm output blocks Conv+bias+ReLU fusion)")
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        for c, i in consumers.get(node.output[0], []):
            if c.op_type not in QUANTIZED_OPS or i != 0:
                problems.append(f"stray Q/DQ: {node.output[0]!r} feeds {c.op_type} {c.name or c.output[0]!r} "
                                f"(input {i}), not a Conv/Gemm input")
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            if not all(c.op_type == "DequantizeLinear" for c, _ in consumers.get(node.output[0], [])):
                problems.append(f"QuantizeLinear {node.name or node.output[0]!r} feeds something other than a "
                                "DequantizeLinear")
    for out in graph.output:
        p = producer.get(out.name)
        if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
            problems.append(f"graph output {out.name!r} leaves through {p.op_type}")
    return problems
