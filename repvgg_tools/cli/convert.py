"""``repvgg-convert INPUT OUTPUT``: training checkpoint -> verified deploy checkpoint.

Exit codes: 0 converted (and verified), 1 verification failed (nothing written), 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import EXIT_OK, EXIT_USAGE, EXIT_VERIFY, Parser, error, one_line, run_command


def build_parser() -> argparse.ArgumentParser:
    from ..contract import DTYPE_RTOL, FUSION_RTOL
    from ..conversion.layouts import LAYOUT_NAMES

    p = Parser(
        prog="repvgg-convert",
        description="Convert a training-form RepVGG / VGG-BN checkpoint (ours, official RepVGG, timm, MMPretrain or "
                    "torchvision layout) to its deploy form: every block fused into one 3x3 conv, verified on random "
                    "inputs before anything is written.",
        epilog="exit codes: 0 ok, 1 verification failed (nothing written), 2 usage or input error",
    )
    p.add_argument("input", help="training checkpoint (.pth/.pt/.ckpt, zip or legacy, or .safetensors)")
    p.add_argument("output", help="deploy checkpoint to write (.safetensors when the name ends so)")
    p.add_argument("--arch", help="model name the weights must fit (default: the checkpoint's 'arch' entry, else "
                                  "inferred from tensor shapes)")
    p.add_argument("--layout", choices=LAYOUT_NAMES, help="input layout (default: detected)")
    p.add_argument("--out-layout", choices=LAYOUT_NAMES, help="output layout (default: the input's)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema/state_dict_ema/ema)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the equivalence check (faster)")
    p.add_argument("--rtol", type=float, help="tolerance of the fusion check, max|a-b|/max|b| between the training "
                   f"form and the deploy form with the unrounded float64 fused weights, both in float64 (default "
                   f"{FUSION_RTOL:g}, any dtype; the written weights must also be that fusion rounded once, exactly; "
                   "the forward with the written weights is reported, not judged). With --model: the tolerance of the "
                   "float64 check of the fused model against yours (default: the one for your model's dtype: "
                   + ", ".join(f"{k} {v:g}" for k, v in DTYPE_RTOL.items()) + ")")
    p.add_argument("--bn-eps", type=float, metavar="EPS", help="BatchNorm epsilon the model was trained with "
                   "(default: the checkpoint's bn_eps entry, else 1e-5, PyTorch's default)")
    p.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="your own network: import FACTORY from your code "
                   "(this runs it: an explicit opt-in), load INPUT into it, fuse every linear sub-graph with the graph "
                   "fuser, verify in float64 and save (see docs/fuser.md)")
    p.add_argument("--export-onnx", metavar="FILE", help="with --model: also write a plain fp32 ONNX")
    p.add_argument("--input-shape", type=int, nargs=4, metavar=("N", "C", "H", "W"),
                   help="with --model: the input the model takes (default: 1 x its first conv's channels x 64 x 64)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT (and the --json file) if present")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE ('-' for stdout)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    return p


def _write_json(path: str, data: dict, force: bool) -> None:
    from ..io.checkpoint import atomic_write

    text = json.dumps(data, indent=2, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=force)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    from ..io.paths import check_outputs

    if args.model is None and (args.export_onnx or args.input_shape):
        error("--export-onnx and --input-shape need --model")
        return EXIT_USAGE
    # every output against every other and against the input, before anything is written
    json_file = None if args.json == "-" else args.json  # '-': stdout
    check_outputs({"OUTPUT": args.output, "--json": json_file, "--export-onnx": args.export_onnx}, (args.input,),
                  args.force)
    if args.model is not None:
        return _convert_user_model(args)
    from ..conversion.api import VerificationError, convert_file

    try:
        report = convert_file(
            args.input, args.output, arch=args.arch, layout=args.layout, out_layout=args.out_layout, ema=args.ema,
            verify=args.verify, force=args.force, progress=not args.quiet, rtol=args.rtol, bn_eps=args.bn_eps,
        )
    except VerificationError as exc:
        report = exc.report
        if not args.quiet:
            print("\n".join(report.summary_lines()))
        error(f"{one_line(exc)}; nothing written")
        if args.json:
            _write_json(args.json, {**report.as_dict(), "exit_code": EXIT_VERIFY}, force=args.force)
        return EXIT_VERIFY
    if not args.quiet:
        print("\n".join(report.summary_lines()))
        print(f"wrote {args.output}")
    if args.json:
        _write_json(args.json, {**report.as_dict(), "exit_code": EXIT_OK}, force=args.force)
    return EXIT_OK


def _convert_user_model(args: argparse.Namespace) -> int:
    """``--model``: the user's network through the graph fuser (``graph_convert.convert_user_model``); input errors
    propagate to :func:`main`, which reports them like every other input error."""
    from ..fx.convert import FusionVerificationError, convert_user_model

    unsupported = [flag for flag, given in (("--arch", args.arch), ("--layout", args.layout),
                                            ("--out-layout", args.out_layout), ("--bn-eps", args.bn_eps)) if given]
    if unsupported:
        error(f"{', '.join(unsupported)} do not apply with --model (your code builds the model)")
        return EXIT_USAGE
    try:
        report = convert_user_model(args.model, args.input, args.output, export_onnx=args.export_onnx,
                                    force=args.force, verify=args.verify, ema=args.ema,
                                    input_shape=args.input_shape, rtol=args.rtol)
    except FusionVerificationError as exc:
        error(f"{one_line(exc)}; nothing written")
        return EXIT_VERIFY
    if not args.quiet:
        v = report.get("verify")
        print(f"fused:       {report['fused']} sub-graphs, {len(report['unfused'])} left as they are")
        for line in report["unfused"][:10]:
            print(f"  unfused:   {line}")
        if v:
            print(f"verify:      float64: max rel err {v['max_rel']:.3e} (tolerance {v['rtol']:.0e}) ok")
        print(f"wrote {args.output}" + (f" and {args.export_onnx}" if args.export_onnx else ""))
    if args.json:
        _write_json(args.json, {**report, "exit_code": EXIT_OK}, force=args.force)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
