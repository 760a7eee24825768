"""The int8 study's runs (``repvgg-int8-study``): the data sets, one shared training recipe, training, fusing,
export, PTQ with each calibration method, QAT, and per fused layer the weight and activation statistics
(:mod:`repvgg_tools.bench.quant_study` computes them)."""

from __future__ import annotations

import argparse
import time

FAMILIES = ("repvgg", "qarepvgg")


DATASETS = ("digits", "shapes")


METHODS = ("minmax", "percentile", "entropy")


SMOKE = dict(epochs=1, qat_epochs=1, image_size=8, width=4, depths=[1, 2, 1, 1, 1], train_samples=128,
             calib_samples=16, test_samples=64, batch_size=32)


def load_data(name: str, args: argparse.Namespace) -> dict:
    """``{train, calib, test}``: each ``(images float32 NCHW, labels int64)``, plus ``classes``."""
    import numpy as np

    from repvgg_tools.bench.quant_study import SHAPES_CLASSES, shapes_dataset
    from repvgg_tools.data import DIGITS_CLASSES, digits_dataset

    if name == "digits":
        train = digits_dataset("train", args.image_size, 3, seed=args.seed).tensors
        test = digits_dataset("val", args.image_size, 3, seed=args.seed).tensors
        x, y = (t.numpy() for t in train)
        n_train = min(args.train_samples, len(x)) if args.smoke else len(x)
        order = np.random.default_rng(args.seed).permutation(len(x))
        calib = order[: args.calib_samples]
        tx, ty = (t.numpy() for t in test)
        n_test = min(args.test_samples, len(tx)) if args.smoke else len(tx)
        return {"train": (x[order[:n_train]], y[order[:n_train]]), "calib": (x[calib], y[calib]),
                "test": (tx[:n_test], ty[:n_test]), "classes": DIGITS_CLASSES}
    kw = dict(image_size=args.image_size, seed=args.seed)
    return {"train": shapes_dataset("train", args.train_samples, **kw),
            "calib": shapes_dataset("calib", args.calib_samples, **kw),
            "test": shapes_dataset("test", args.test_samples, **kw), "classes": SHAPES_CLASSES}


def build_model(family: str, args: argparse.Namespace, classes: int):
    """The family's network at the study's size, initialized from the seed (identical for both families)."""
    from repvgg_tools.blocks import QARepVGGBlock, RepVGGBlock
    from repvgg_tools.models import RepVGG
    from repvgg_tools.training.state import seed_everything

    w = args.width
    seed_everything(args.seed)
    block = QARepVGGBlock if family == "qarepvgg" else RepVGGBlock
    return RepVGG([w, w, 2 * w, 4 * w, 8 * w], args.depths, num_classes=classes, block=block)


def recipe(args: argparse.Namespace, epochs: int, lr: float) -> dict:
    """The one training recipe both families share (repvgg_tools.training's schema)."""
    from repvgg_tools.training.config import validate_recipe

    return validate_recipe({"epochs": epochs, "batch_size": args.batch_size, "seed": args.seed,
                            "optim": {"opt": "momentum", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4},
                            "sched": {"name": "cosine", "warmup_epochs": 0}, "ema": {"enabled": False}})


def fit(model, data: tuple, rec: dict, log_prefix: str, quiet: bool) -> list[float]:
    """Train ``model`` in place with the recipe's optimizer, scheduler and loss; returns the loss per epoch."""
    import torch

    from repvgg_tools.training import build
    from repvgg_tools.training.state import seed_everything

    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    steps = len(x) // rec["batch_size"]
    if steps < 1:
        raise ValueError(f"--batch-size {rec['batch_size']} is larger than the training set ({len(x)} images)")
    optimizer = build.build_optimizer(rec, model)
    scheduler = build.build_scheduler(rec, optimizer, steps)
    _, criterion = build.build_mixup_and_loss(rec, int(y.max()) + 1)
    seed_everything(rec["seed"])
    gen = torch.Generator().manual_seed(rec["seed"])
    losses, step = [], 0
    for epoch in range(rec["epochs"]):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(steps):
            idx = order[i * rec["batch_size"]:(i + 1) * rec["batch_size"]]
            loss = criterion(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            total += loss.item()
        if scheduler is not None:
            scheduler.step(epoch + 1)
        losses.append(total / steps)
        if not quiet:
            print(f"  {log_prefix} epoch {epoch + 1}/{rec['epochs']}: loss {losses[-1]:.4f}", flush=True)
    return losses


def layer_map(proto) -> dict[str, str]:
    """``{layer name: ONNX activation tensor}`` for every Conv/Gemm (the exporter keeps ``<layer>.weight``)."""
    from repvgg_tools.export.qdq import QUANTIZED_OPS

    return {n.input[1].removesuffix(".weight"): n.input[0] for n in proto.graph.node if n.op_type in QUANTIZED_OPS}


def layer_inputs(model, images, names) -> dict:
    """Float64 numpy inputs of the named Conv2d/Linear layers of ``model`` on ``images``."""
    import torch

    got: dict = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, inp, n=n: got.setdefault(n, []).append(inp[0].detach().double().numpy())) for n in names]
    try:
        with torch.no_grad():
            model.eval()
            for i in range(0, len(images), 128):
                model(torch.from_numpy(images[i:i + 128]))
    finally:
        for h in handles:
            h.remove()
    import numpy as np

    return {n: np.concatenate(v) for n, v in got.items()}


def qdq_thresholds(proto_int8) -> dict[str, float]:
    """``{activation tensor: threshold}`` an int8 Q/DQ model was built with (its QuantizeLinear scale x 127)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto_int8.graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) * 127.0
            for n in proto_int8.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits}


def per_layer(deploy, proto, test_images, thresholds: dict[str, dict[str, float]], identity: set[str]
              ) -> list[dict]:
    """Weight and activation statistics of every quantized layer of a fused model: activations on held-out
    images, quantized at the thresholds each PTQ export calibrated (``{method: {tensor: threshold}}``). Layers
    named in ``identity`` fused an identity branch."""
    from repvgg_tools.bench.quant_study import activation_statistics, weight_statistics

    layers = layer_map(proto)
    acts = layer_inputs(deploy, test_images, list(layers))
    rows = []
    for name, tensor in layers.items():
        weight = deploy.get_submodule(name).weight.detach().double().numpy()
        ts = {m: t[tensor] for m, t in thresholds.items()}
        rows.append({"layer": name, "identity": name in identity, "weight": weight_statistics(weight),
                     "activation": activation_statistics(acts[name], ts)})
    return rows


def study_family(family: str, data: dict, args: argparse.Namespace, log) -> dict:
    """Train, fuse, export, PTQ with every method, QAT; returns the family's section of the report."""
    import torch

    from repvgg_tools import reparameterize
    from repvgg_tools.export.calibration import CalibrationSource
    from repvgg_tools.export.int8 import export_int8
    from repvgg_tools.export.onnx import export_onnx
    from repvgg_tools.training.qat import prepare_qat, qat_state

    t0 = time.perf_counter()
    model = build_model(family, args, data["classes"])
    losses = fit(model, data["train"], recipe(args, args.epochs, args.lr), family, args.quiet)
    identity = {f"{n}.reparam" for n, m in model.named_modules() if getattr(m, "branch_identity", None) is not None}
    deploy = reparameterize(model.eval()).eval()
    proto = export_onnx(deploy, args.image_size)
    calib = CalibrationSource.from_arrays(data["name"], data["calib"][0], data["test"][0], data["test"][1],
                                          min_held_out=1)
    result: dict = {"params": sum(p.numel() for p in model.parameters()), "train_loss": losses,
                    "seconds": {"train": time.perf_counter() - t0}}
    accuracy: dict = {}
    agreement: dict = {}
    thresholds: dict = {}
    t1 = time.perf_counter()
    for method in args.methods:
        proto_int8, report = export_int8(deploy, proto, calib, method=method)
        thresholds[method] = qdq_thresholds(proto_int8)
        accuracy["fp32"] = report.accuracy["fp32"]
        accuracy[f"ptq_{method}"] = report.accuracy["int8"]
        agreement[f"ptq_{method}"] = {"top1_agreement": report.metrics["top1_agreement"],
                                      "cosine": report.metrics["cosine_mean"],
                                      "rel_error": report.metrics["rel_error"], "passed_floors": report.passed}
        log(f"  {family} PTQ {method}: top-1 {report.accuracy['int8']:.4f} (fp32 {report.accuracy['fp32']:.4f})")
    result["layers"] = per_layer(deploy, proto, data["test"][0], thresholds, identity)
    result["seconds"]["ptq_and_statistics"] = time.perf_counter() - t1
    if args.qat_epochs > 0:
        t2 = time.perf_counter()
        calib_t = torch.from_numpy(data["calib"][0])
        qat_model = prepare_qat(model, [calib_t[i:i + 64] for i in range(0, len(calib_t), 64)])
        fit(qat_model, data["train"], recipe(args, args.qat_epochs, args.qat_lr), f"{family} QAT", args.quiet)
        plain, quant = qat_state(qat_model)
        qat_deploy = reparameterize(model.eval()).eval()
        qat_deploy.load_state_dict(plain)
        qat_proto = export_onnx(qat_deploy, args.image_size)
        _, report = export_int8(qat_deploy, qat_proto, calib, qat=quant)
        accuracy["qat_fp32"] = report.accuracy["fp32"]
        accuracy["qat_int8"] = report.accuracy["int8"]
        agreement["qat_int8"] = {"top1_agreement": report.metrics["top1_agreement"],
                                 "cosine": report.metrics["cosine_mean"], "rel_error": report.metrics["rel_error"],
                                 "passed_floors": report.passed}
        result["seconds"]["qat"] = time.perf_counter() - t2
        log(f"  {family} QAT: int8 top-1 {report.accuracy['int8']:.4f}")
    result["accuracy"], result["agreement"] = accuracy, agreement
    return result
