#!/usr/bin/env python
"""RepVGG Faster R-CNN end to end on a tiny synthetic set: build, train briefly, convert, compare, export, time.

Trains a RepVGG-A0 (or, with --tiny, a small custom RepVGG) + FPN Faster R-CNN on rectangles drawn on noise,
converts it to the plain deploy form twice (``reparameterize`` in memory, and a saved checkpoint through
``repvgg-convert`` loaded into ``repvgg_fasterrcnn(..., deploy=True)``), checks that detections are the same,
exports the plain backbone's multi-scale features to ONNX (checked on onnxruntime) and prints parameter counts and
CPU latency of the training and deploy forms.

Examples:
    python tools/detector_example.py                      # RepVGG-A0, 192x192 images, files in a temp dir
    python tools/detector_example.py --tiny --steps 20    # a small custom RepVGG, seconds
    python tools/detector_example.py --out-dir runs/det --force --threads 2 --json runs/det/report.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repvgg_tools.cli.common import Parser, error, run_command

CONVERT_MODULE = "repvgg_tools.cli.convert"
TINY_WIDTHS, TINY_DEPTHS = (16, 16, 32, 64, 128), (1, 2, 2, 4, 1)


def build(args, deploy: bool):
    from repvgg_tools.detection import repvgg_fasterrcnn
    from repvgg_tools.models import RepVGG

    size = args.image_size
    arch = RepVGG(TINY_WIDTHS, TINY_DEPTHS, features_only=True, out_indices=(1, 2, 3, 4), deploy=deploy) \
        if args.tiny else args.arch
    base = max(4, size // 12)
    return repvgg_fasterrcnn(
        arch, args.num_classes + 1, deploy=deploy, fpn_channels=64 if args.tiny else 256,
        anchor_sizes=tuple(base * 2**i for i in range(5)), min_size=size, max_size=size,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_detections_per_img=50, box_score_thresh=0.01,
    )


def latency_ms(fns: dict, x, runs: int) -> dict[str, float]:
    """Median latency per callable, runs interleaved so that load changes on a shared machine hit every form alike."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(x)
            fn(x)
        for _ in range(runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def convert_with_cli(src: Path, dst: Path, force: bool) -> str | None:
    """Run the real converter; ``None`` when it is not installed."""
    import importlib.util

    if importlib.util.find_spec(CONVERT_MODULE) is None:
        return None
    cmd = [sys.executable, "-m", CONVERT_MODULE, str(src), str(dst)] + (["--force"] if force else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"repvgg-convert failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def export_features(body, path: Path, size: int, force: bool) -> dict:
    """Export the plain backbone's feature maps to ONNX (dynamic batch) and compare on onnxruntime."""
    import importlib.util

    import torch

    from repvgg_tools.io.checkpoint import atomic_write
    from repvgg_tools.verify import compare_outputs

    body = body.eval()
    x = torch.randn(1, 3, size, size)
    names = [f"feat{i}" for i in range(len(body.feature_info.out_indices))]
    dynamo = importlib.util.find_spec("onnxscript") is not None  # the dynamo exporter needs onnxscript

    def write(tmp: str) -> None:
        if dynamo:
            torch.onnx.export(body, (x,), tmp, dynamo=True, input_names=["x"], output_names=names,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
                              external_data=False)
        else:
            torch.onnx.export(body, (x,), tmp, dynamo=False, input_names=["x"], output_names=names,
                              dynamic_axes={"x": {0: "batch"}})

    atomic_write(path, write, force=force)
    report = {"path": str(path), "exporter": "dynamo" if dynamo else "torchscript", "outputs": names}
    try:
        import onnxruntime as ort
    except ImportError:
        return report
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 3, size, size)
    outs = [torch.from_numpy(o) for o in session.run(None, {"x": x2.numpy()})]
    with torch.no_grad():
        report["onnxruntime_max_rel_err"] = compare_outputs(outs, body(x2))[1]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="repvgg_a0", help="registered RepVGG/VGG name (default repvgg_a0)")
    parser.add_argument("--tiny", action="store_true", help=f"a small custom RepVGG {TINY_WIDTHS} instead of --arch")
    parser.add_argument("--image-size", type=int, default=192, help="square image side (default 192)")
    parser.add_argument("--num-images", type=int, default=8, help="synthetic training images (default 8)")
    parser.add_argument("--num-classes", type=int, default=3, help="object classes (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="training steps, batch 4 (default 30)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed runs per form (default 10)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, help="where checkpoints and ONNX go (default: a new temp dir)")
    parser.add_argument("--force", action="store_true", help="overwrite files in --out-dir")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    return run_command(lambda: _main(args, parser), traceback=args.traceback)


def _main(args: argparse.Namespace, parser: Parser) -> int:
    if args.image_size < 64 or args.steps < 0 or args.num_images < 1 or args.latency_runs < 1:
        parser.error("need --image-size >= 64, --steps >= 0, --num-images >= 1, --latency-runs >= 1")

    import torch

    from repvgg_tools import load_checkpoint, reparameterize, save_checkpoint
    from repvgg_tools.detection import compare_detections, synthetic_shapes
    from repvgg_tools.io.checkpoint import CheckpointError, atomic_write
    from repvgg_tools.io.paths import check_outputs
    from repvgg_tools.verify import compare_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="repvgg_detector_"))
    try:
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir}: not a directory")
        train_ckpt, deploy_ckpt = out_dir / "detector_train.pth", out_dir / "detector_deploy.pth"
        onnx_path = out_dir / "backbone_features.onnx"
        check_outputs({"training checkpoint": train_ckpt, "deploy checkpoint": deploy_ckpt, "ONNX": onnx_path,
                       "--json": args.json}, (), args.force)  # every output, before hours of training
        model = build(args, deploy=False)
        images, targets = synthetic_shapes(args.num_images, args.image_size, args.num_classes, seed=0)
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        start = time.perf_counter()
        model.train()
        for step in range(args.steps):
            idx = [(step * 4 + i) % args.num_images for i in range(4)]
            losses = model([images[i] for i in idx], [targets[i] for i in idx])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step + 1:3d}/{args.steps}  loss {loss.item():.3f}")
        train_s = time.perf_counter() - start
        model.eval()
        test_images, _ = synthetic_shapes(2, args.image_size, args.num_classes, seed=1)
        x = torch.stack(test_images)
        with torch.no_grad():
            ref = model(test_images)
            ref_feats = model.backbone.body(x)

        box_tol = 1e-4 * args.image_size
        deployed = reparameterize(model)
        with torch.no_grad():
            in_memory = compare_detections(ref, deployed(test_images), box_tol=box_tol, score_tol=1e-5)
            in_memory["backbone_max_rel_err"] = compare_outputs(deployed.backbone.body(x), ref_feats)[1]

        save_checkpoint(model.state_dict(), train_ckpt, force=args.force)
        via_cli = None
        if convert_with_cli(train_ckpt, deploy_ckpt, args.force) is not None:
            plain = build(args, deploy=True).eval()
            state = load_checkpoint(deploy_ckpt)
            plain.load_state_dict(state.get("state_dict", state), strict=True)
            with torch.no_grad():
                via_cli = compare_detections(ref, plain(test_images), box_tol=box_tol, score_tol=1e-5)
        onnx_report = export_features(deployed.backbone.body, onnx_path,
                                      args.image_size, args.force)

        one = x[:1]
        report = {
            "arch": "tiny" if args.tiny else args.arch, "image_size": args.image_size, "steps": args.steps,
            "train_seconds": round(train_s, 1), "final_loss": round(loss.item(), 4) if args.steps else None,
            "threads": torch.get_num_threads(),
            "params": {"train": count_params(model), "deploy": count_params(deployed)},
            "backbone_params": {"train": count_params(model.backbone.body),
                                "deploy": count_params(deployed.backbone.body)},
            "latency_ms": latency_ms({"train": lambda t: model([t[0]]), "deploy": lambda t: deployed([t[0]])},
                                     one, args.latency_runs),
            "backbone_latency_ms": latency_ms({"train": model.backbone.body, "deploy": deployed.backbone.body},
                                              one, args.latency_runs),
            "reparameterize": in_memory, "repvgg_convert": via_cli, "onnx": onnx_report, "out_dir": str(out_dir),
        }
    except (ValueError, CheckpointError, RuntimeError, OSError) as exc:
        error(exc)
        return 2

    p, lat, blat = report["params"], report["latency_ms"], report["backbone_latency_ms"]
    print(f"\n{report['arch']} Faster R-CNN, {args.image_size}x{args.image_size}, "
          f"{report['threads']} CPU threads, median of {args.latency_runs} runs, batch 1")
    print(f"{'':10s}{'params':>14s}{'detector ms':>14s}{'backbone ms':>14s}")
    for form in ("train", "deploy"):
        print(f"{form:10s}{p[form]:>14,d}{lat[form]:>14.1f}{blat[form]:>14.1f}")
    for name in ("reparameterize", "repvgg_convert"):
        r = report[name]
        if r is None:
            print(f"{name}: skipped ({CONVERT_MODULE} is not installed)")
            continue
        extra = f", backbone max rel err {r['backbone_max_rel_err']:.2e}" if "backbone_max_rel_err" in r else ""
        print(f"{name}: same detections: {r['same']} ({r['detections']} boxes; max box diff "
              f"{r['max_box_diff']:.2e} px, max score diff {r['max_score_diff']:.2e}{extra}) {r['reason']}")
    o = report["onnx"]
    err = f", onnxruntime max rel err {o['onnxruntime_max_rel_err']:.2e}" if "onnxruntime_max_rel_err" in o else ""
    print(f"onnx: {o['path']} ({o['exporter']} exporter, outputs {', '.join(o['outputs'])}{err})")
    if args.json:
        try:
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)), force=args.force)
        except CheckpointError as exc:
            error(exc)
            return 2
    same = report["reparameterize"]["same"] and (via_cli is None or via_cli["same"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
