#!/usr/bin/env python
"""The int8 study: RepVGG vs QARepVGG of the same size, same recipe, under PTQ (each calibration method) and QAT.

For each dataset (the bundled digits; a deterministic shapes-and-textures set, repvgg_tools.bench.quant_study) both
families are trained with one recipe and seed, fused, exported to ONNX and quantized to TensorRT-style int8 Q/DQ
with each calibration method (calibration images never overlap the held-out images) and by quantization-aware
fine-tuning. Reported: held-out top-1 of fp32, every PTQ method and QAT (the Q/DQ ONNX run as written on
onnxruntime), and per fused layer the weight SQNR (per channel, as exported, and per tensor), the spread of the
per-channel weight ranges, the activation outlier ratio max/p99.9 and the activation SQNR at each method's
threshold. Writes OUT/report.md, OUT/report.json and OUT/report.png (matplotlib); never overwrites without --force.

Examples:
    python tools/int8_study.py --out runs/int8_study
    python tools/int8_study.py --out /tmp/s --smoke
    python tools/int8_study.py --out runs/s2 --datasets shapes --epochs 12 --width 24 --force
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from repvgg_tools.cli.common import EXIT_USAGE, Parser, error, run_command  # noqa: E402  (needs the path above)

FAMILIES = ("repvgg", "qarepvgg")
DATASETS = ("digits", "shapes")
METHODS = ("minmax", "percentile", "entropy")
REPORT_FILES = ("report.md", "report.json", "report.png")
SMOKE = dict(epochs=1, qat_epochs=1, image_size=8, width=4, depths=[1, 2, 1, 1, 1], train_samples=128,
             calib_samples=16, test_samples=64, batch_size=32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__)
    p.add_argument("--out", required=True, help="output directory (created; report.* never overwritten without "
                                                 "--force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="PTQ calibration methods")
    p.add_argument("--epochs", type=int, default=10, help="fp32 training epochs (both families)")
    p.add_argument("--qat-epochs", type=int, default=2, help="quantization-aware fine-tuning epochs (0: no QAT)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16, help="stage widths W, W, 2W, 4W, 8W")
    p.add_argument("--depths", type=int, nargs=5, default=[1, 2, 2, 2, 1], metavar="D",
                   help="blocks per stage (stage 0 must be 1)")
    p.add_argument("--train-samples", type=int, default=8000, help="shapes: training images")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration images (from the training split)")
    p.add_argument("--test-samples", type=int, default=1000, help="shapes: held-out images (digits: its val split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="SGD momentum learning rate")
    p.add_argument("--qat-lr", type=float, default=0.001, help="QAT learning rate (the fused model has no BatchNorm: "
                   "recipes/digits_qat.yaml's 0.001)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny configuration for tests (seconds): "
                   + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    positive = {"--epochs": args.epochs, "--image-size": args.image_size, "--width": args.width,
                "--train-samples": args.train_samples, "--calib-samples": args.calib_samples,
                "--test-samples": args.test_samples, "--batch-size": args.batch_size}
    for name, value in positive.items():
        if value < 1:
            p.error(f"{name} must be >= 1, not {value}")
    if args.qat_epochs < 0 or not args.lr > 0 or not args.qat_lr > 0:
        p.error("--qat-epochs must be >= 0, --lr and --qat-lr > 0")
    if args.depths[0] != 1 or min(args.depths) < 1:
        p.error(f"--depths must be 5 numbers >= 1 with 1 first, not {args.depths}")
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8, not {args.image_size}")
    args.methods = list(dict.fromkeys(args.methods))
    args.datasets = list(dict.fromkeys(args.datasets))
    return args


def check_outputs(out: Path, force: bool) -> None:
    """Fail before any work when a report file exists (without --force) or the directory cannot be made; makes it.

    Raises:
        ValueError: (``CheckpointError`` included) with a one-line message.
    """
    from repvgg_tools.io.checkpoint import check_output_path

    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    for name in REPORT_FILES:
        if (out / name).exists() or (out / name).is_symlink():
            check_output_path(out / name, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{out}: cannot create the directory ({exc.strerror})") from None
    for name in REPORT_FILES:
        check_output_path(out / name, force)


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


def _f(v: float, digits: int = 1) -> str:
    return "inf" if v == math.inf else ("-inf" if v == -math.inf else f"{v:.{digits}f}")


def summary(fam: dict) -> dict:
    """Per-family aggregates of the per-layer statistics over all layers, and separately over the layers that fused
    an identity branch (``id_*``) and those that did not (``noid_*``)."""
    out = {}
    groups = {"": fam["layers"], "id_": [r for r in fam["layers"] if r["identity"]],
              "noid_": [r for r in fam["layers"] if not r["identity"]]}
    for prefix, layers in groups.items():
        if not layers:
            continue

        def vals(kind: str, key: str, layers=layers) -> list[float]:
            return [r[kind][key] for r in layers if key in r[kind]]

        for key in ("sqnr_per_channel", "sqnr_per_tensor"):
            v = [x for x in vals("weight", key) if math.isfinite(x)]
            out[f"{prefix}weight_{key}_mean"], out[f"{prefix}weight_{key}_min"] = sum(v) / len(v), min(v)
        for key in ("range_spread", "std_spread", "max_over_std"):
            out[f"{prefix}weight_{key}_max"] = max(vals("weight", key))
            out[f"{prefix}weight_{key}_mean"] = sum(vals("weight", key)) / len(layers)
        out[f"{prefix}act_outlier_ratio_max"] = max(vals("activation", "outlier_ratio"))
        out[f"{prefix}act_outlier_ratio_mean"] = sum(vals("activation", "outlier_ratio")) / len(layers)
        for key in [k for k in layers[0]["activation"] if k.startswith("sqnr_")]:
            v = [x for x in vals("activation", key) if math.isfinite(x)]
            out[f"{prefix}act_{key}_mean"] = sum(v) / len(v)
    return out


def markdown(report: dict) -> str:
    """The report's tables."""
    cfg = report["config"]
    lines = ["# int8 study: RepVGG vs QARepVGG", "",
             f"Command: `{cfg['command']}`  ", f"Wall time: {report['wall_seconds']:.0f} s; widths {cfg['widths']}, "
             f"depths {cfg['depths']}, {cfg['image_size']}x{cfg['image_size']}, {cfg['epochs']} epochs "
             f"(+{cfg['qat_epochs']} QAT at lr {cfg['qat_lr']}), SGD lr {cfg['lr']}, batch {cfg['batch_size']}, "
             f"seed {cfg['seed']}.", "",
             "Top-1 on held-out images (never used for calibration); int8 = TensorRT-style Q/DQ ONNX run as written "
             "on onnxruntime (exact_qdq). Weight SQNR: symmetric int8, per channel (as exported) and per tensor. "
             "Outlier ratio: max|x| / 99.9th percentile of |x| of a layer's input on held-out images. Spread: "
             "largest / smallest per-output-channel max|W| of the fused kernel.", ""]
    for ds, section in report["datasets"].items():
        methods = cfg["methods"]
        cols = ["fp32"] + [f"ptq_{m}" for m in methods] + (["qat_int8"] if cfg["qat_epochs"] else [])
        lines += [f"## {ds} ({section['classes']} classes, {section['samples']['train']} train / "
                  f"{section['samples']['calib']} calibration / {section['samples']['test']} held-out)", "",
                  "| family | params | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for fam, r in section["families"].items():
            lines.append(f"| {fam} | {r['params']} | " + " | ".join(f"{r['accuracy'][c]:.2%}" for c in cols) + " |")
        lines += ["", "Statistics over the fused layers: all layers, the layers that fused an identity branch (id), "
                  "the others (no id); mean, and worst in brackets:", "",
                  "| family | layers | W SQNR per-channel dB | W SQNR per-tensor dB | range spread | std spread | "
                  "max/std | act max/p99.9 | " + " | ".join(f"act SQNR {m} dB" for m in methods) + " |",
                  "|---|---|" + "---:|" * (6 + len(methods))]
        for fam, r in section["families"].items():
            s = r["summary"]
            for prefix, label in (("", "all"), ("id_", "id"), ("noid_", "no id")):
                if f"{prefix}weight_sqnr_per_channel_mean" not in s:
                    continue
                g = {k.removeprefix(prefix): v for k, v in s.items() if k.startswith(prefix)}
                lines.append(
                    f"| {fam} | {label} | {_f(g['weight_sqnr_per_channel_mean'])} "
                    f"({_f(g['weight_sqnr_per_channel_min'])}) | {_f(g['weight_sqnr_per_tensor_mean'])} "
                    f"({_f(g['weight_sqnr_per_tensor_min'])}) | {_f(g['weight_range_spread_mean'])} "
                    f"({_f(g['weight_range_spread_max'])}) | {_f(g['weight_std_spread_mean'])} "
                    f"({_f(g['weight_std_spread_max'])}) | {_f(g['weight_max_over_std_mean'])} "
                    f"({_f(g['weight_max_over_std_max'])}) | {_f(g['act_outlier_ratio_mean'], 2)} "
                    f"({_f(g['act_outlier_ratio_max'], 2)}) | "
                    + " | ".join(_f(g[f"act_sqnr_{m}_mean"]) for m in methods) + " |")
        for fam, r in section["families"].items():
            lines += ["", f"Per layer, {fam} on {ds}:", "",
                      "| layer | W SQNR ch | W SQNR tensor | range spread | std spread | max/std | act max/p99.9 | "
                      + " | ".join(f"act SQNR {m}" for m in methods) + " |", "|---|" + "---:|" * (6 + len(methods))]
            for row in r["layers"]:
                w, a = row["weight"], row["activation"]
                tag = " (id)" if row["identity"] else ""
                lines.append(f"| {row['layer']}{tag} | {_f(w['sqnr_per_channel'])} | {_f(w['sqnr_per_tensor'])} | "
                             f"{_f(w['range_spread'])} | {_f(w['std_spread'])} | {_f(w['max_over_std'])} | "
                             f"{_f(a['outlier_ratio'], 2)} | "
                             + " | ".join(_f(a[f"sqnr_{m}"]) for m in methods) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, force: bool) -> str | None:
    """report.png: per dataset, accuracy bars and per-layer weight / activation SQNR of both families. Returns a
    note when matplotlib is missing (no PNG), else None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no report.png"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.io.checkpoint import atomic_write

    sections = report["datasets"]
    fig, axes = plt.subplots(len(sections), 3, figsize=(16, 4.2 * len(sections)), squeeze=False)
    colours = {"repvgg": "tab:red", "qarepvgg": "tab:blue"}
    methods = report["config"]["methods"]
    for row, (ds, section) in zip(axes, sections.items(), strict=True):
        fams = section["families"]
        cols = list(next(iter(fams.values()))["accuracy"])
        cols = [c for c in cols if c != "qat_fp32"]
        for i, (fam, r) in enumerate(fams.items()):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(cols))]
            row[0].bar(xs, [r["accuracy"][c] for c in cols], 0.38, label=fam, color=colours[fam])
        row[0].set_xticks(range(len(cols)), [c.replace("_", "\n") for c in cols], fontsize=8)
        row[0].set_ylim(0, 1)
        row[0].set_title(f"{ds}: held-out top-1")
        row[0].legend(fontsize=8)
        for fam, r in fams.items():
            n = range(len(r["layers"]))
            row[1].plot(n, [x["weight"]["sqnr_per_channel"] for x in r["layers"]], "o-", color=colours[fam],
                        label=f"{fam} per-channel")
            row[1].plot(n, [x["weight"]["sqnr_per_tensor"] for x in r["layers"]], "s--", color=colours[fam],
                        label=f"{fam} per-tensor")
            for m, style in zip(methods, ("o-", "s--", "^:"), strict=False):
                row[2].plot(n, [x["activation"][f"sqnr_{m}"] for x in r["layers"]], style, color=colours[fam],
                            label=f"{fam} {m}")
        for i, layer in enumerate(next(iter(fams.values()))["layers"]):
            if layer["identity"]:
                for ax in row[1:]:
                    ax.axvspan(i - 0.4, i + 0.4, color="0.9", zorder=0)
        row[1].set_title(f"{ds}: fused weight SQNR (dB) per layer (grey: identity fused)")
        row[2].set_title(f"{ds}: activation SQNR (dB) per layer input")
        for ax in row[1:]:
            ax.set_xlabel("layer (graph order)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=force)
    plt.close(fig)
    return None


def _finite(obj):
    """``obj`` with non-finite floats as the strings ``inf``, ``-inf``, ``nan`` (strict JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: _main(args, argv), traceback=args.traceback)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    out = Path(args.out)
    try:
        check_outputs(out, args.force)
    except ValueError as exc:  # CheckpointError is a ValueError
        error(exc)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from repvgg_tools.bench.quant_study import SHAPES, TEXTURES
    from repvgg_tools.io.checkpoint import atomic_write

    torch.set_num_threads(1 if args.smoke else max(1, min(torch.get_num_threads(), 2)))  # smoke: tiny ops

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    start = time.perf_counter()
    w = args.width
    report: dict = {"config": {
        "command": " ".join(["python", "tools/int8_study.py", *(sys.argv[1:] if argv is None else argv)]),
        "widths": [w, w, 2 * w, 4 * w, 8 * w], "depths": args.depths, "image_size": args.image_size,
        "epochs": args.epochs, "qat_epochs": args.qat_epochs, "lr": args.lr, "qat_lr": args.qat_lr,
        "batch_size": args.batch_size,
        "seed": args.seed, "methods": args.methods, "datasets": args.datasets, "smoke": args.smoke,
        "shapes_classes": [f"{s}/{t}" for s in SHAPES for t in TEXTURES]}, "datasets": {}}
    for ds in args.datasets:
        data = load_data(ds, args)
        data["name"] = ds
        log(f"{ds}: {len(data['train'][0])} train, {len(data['calib'][0])} calibration, "
            f"{len(data['test'][0])} held-out images, {data['classes']} classes")
        section = {"classes": data["classes"], "families": {},
                   "samples": {k: len(data[k][0]) for k in ("train", "calib", "test")}}
        for fam in FAMILIES:
            section["families"][fam] = study_family(fam, data, args, log)
            section["families"][fam]["summary"] = summary(section["families"][fam])
        report["datasets"][ds] = section
    report["wall_seconds"] = time.perf_counter() - start
    note = plot(report, out / "report.png", args.force)
    if note:
        report["notes"] = [note]
    text = markdown(report) + (f"\nNote: {note}\n" if note else "")
    body = json.dumps(_finite(report), indent=1, allow_nan=False)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(body), force=args.force)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=args.force)
    log(text)
    log(f"wrote {out}/report.md, report.json{'' if note else ', report.png'} in {report['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
