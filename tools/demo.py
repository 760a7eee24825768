#!/usr/bin/env python
"""Quickstart (``make demo``): train RepVGG-A0 on the bundled digits set, convert it with ``repvgg-convert``, export
ONNX with ``repvgg-export``, and compare the training model, the deploy model and the ONNX model on the held-out
split: parameters, accuracy, max error against the training model and CPU latency. Writes ``demo_out/``.

Runs on 2 CPU cores in a few minutes; nothing is downloaded. ``--epochs`` and ``--out`` change the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from repvgg_tools.bench.timing import time_callable  # noqa: E402
from repvgg_tools.cli.common import Parser, error, run_command  # noqa: E402  (needs the path above)

RECIPE = ROOT / "recipes" / "digits_quickstart.yaml"
MIN_ACCURACY = 95.0


def run(cmd: list[str], what: str) -> None:
    """Run one pipeline step as its own process (the real CLIs), echoing the command; stop on failure."""
    print(f"\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    if subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode:
        raise SystemExit(f"error: {what} failed (see above)")


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


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out/, replaced on each run)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    args = p.parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    start = time.perf_counter()

    from repvgg_tools.training import load_recipe

    overrides = [f"output={out / 'run'}", "force=true"] + ([f"epochs={args.epochs}"] if args.epochs else [])
    image_size = load_recipe(RECIPE, overrides)["data"]["image_size"]
    run([py, "tools/train.py", "--recipe", RECIPE, *overrides], "training")
    run([py, "-m", "repvgg_tools.cli.convert", out / "run" / "last.pth", out / "deploy.pth", "--force",
         "--json", out / "convert.json"], "repvgg-convert")
    run([py, "-m", "repvgg_tools.cli.export", out / "deploy.pth", out / "model.onnx", "--input-size", image_size,
         "--force", "--json", out / "export.json"], "repvgg-export")

    rows = evaluate(out, image_size)
    from repvgg_tools.data import digits_dataset

    table = print_table(rows, len(digits_dataset("val", image_size=image_size)))
    plot(rows, out / "demo.png")
    (out / "demo.json").write_text(json.dumps(rows, indent=1))
    (out / "demo.md").write_text(table + "\n")
    print(f"\nwrote {out / 'demo.png'}, {out / 'demo.json'} ({time.perf_counter() - start:.0f} s in all)")
    accs = {round(r["accuracy"], 6) for r in rows}
    worst = min(r["accuracy"] for r in rows)
    if len(accs) != 1 or worst < MIN_ACCURACY:
        got = ", ".join(f"{r['accuracy']:.2f}%" for r in rows)
        error(f"expected the same accuracy >= {MIN_ACCURACY}% for every form, got {got}")
        return 1
    print(f"ok: all three forms reach {worst:.2f}% on the held-out split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
