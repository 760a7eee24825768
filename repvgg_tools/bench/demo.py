"""The quickstart's comparison (``repvgg-demo``): accuracy, max error against the training model and batch-1 CPU
latency of the training, deploy and ONNX forms on the held-out digits, as a table and a PNG."""

from __future__ import annotations

from pathlib import Path

import torch

from .timing import time_callable


def evaluate(out: Path, image_size: int) -> list[dict]:
    """Accuracy, max error vs the training model and batch-1 CPU latency of the three forms."""
    import numpy as np
    import onnxruntime as ort

    from repvgg_tools import create_model, load_checkpoint
    from repvgg_tools.data import digits_dataset

    images, labels = digits_dataset("val", image_size=image_size).tensors
    train_ckpt = load_checkpoint(out / "run" / "last.pth")
    arch, classes = train_ckpt["arch"], train_ckpt["num_classes"]
    training = create_model(arch, num_classes=classes).eval()
    training.load_state_dict(train_ckpt["state_dict"])
    deploy_ckpt = load_checkpoint(out / "deploy.pth")
    deploy = create_model(arch, num_classes=classes, deploy=True).eval()
    deploy.load_state_dict(deploy_ckpt.get("state_dict", deploy_ckpt))  # strict: every key is a deploy key
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    with torch.inference_mode():
        ref = training(images)
        forms = {
            "training (multi-branch)": (training, lambda x: training(x), sum(p.numel() for p in training.parameters())),
            "deploy (plain 3x3)": (deploy, lambda x: deploy(x), sum(p.numel() for p in deploy.parameters())),
            "ONNX (onnxruntime)": (None, lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]),
                                   sum(int(np.prod(t.dims)) for t in _onnx_initializers(out / "model.onnx"))),
        }
        rows = []
        one = images[:1].contiguous()
        for form, (_, fn, n_params) in forms.items():
            logits = torch.cat([fn(images[i:i + 64]) for i in range(0, len(images), 64)])
            acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
            err = ((logits - ref).abs().max() / ref.abs().max()).item()
            rows.append({"form": form, "params": n_params, "accuracy": acc, "max_rel_error": err,
                         "agree_with_training": (logits.argmax(1) == ref.argmax(1)).float().mean().item(),
                         "latency_ms": time_callable(lambda fn=fn: fn(one))["median_ms"]})
    return rows


def _onnx_initializers(path: Path):
    import onnx

    return onnx.load(str(path)).graph.initializer


def print_table(rows: list[dict], n_val: int) -> str:
    head = f"{'form':<26} {'params':>11} {'accuracy':>9} {'max rel err':>12} {'latency (ms, batch 1)':>22}"
    lines = [f"held-out digits: {n_val} images", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['form']:<26} {r['params']:>11,} {r['accuracy']:>8.2f}% {r['max_rel_error']:>12.2e} "
                     f"{r['latency_ms']:>22.3f}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.io.checkpoint import atomic_write

    names = [r["form"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["#888888", "#1f77b4", "#2ca02c"]
    ax1.bar(names, [r["accuracy"] for r in rows], color=colors)
    ax1.set_ylim(min(90.0, min(r["accuracy"] for r in rows) - 1), 100)
    ax1.set_ylabel("held-out accuracy (%)")
    ax2.bar(names, [r["latency_ms"] for r in rows], color=colors)
    ax2.set_ylabel("CPU latency, batch 1 (ms)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("RepVGG-A0 on digits: training vs deploy vs ONNX")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)
