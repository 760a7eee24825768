"""Build a TensorRT (10.x/11.x) or TensorRT-RTX engine from an ONNX model written by ``repvgg-export``.

    repvgg-build-trt --onnx model.onnx --engine model.engine [--min-batch 1 --opt-batch 8 --max-batch 32]

Precision comes from the ONNX (fp16 tensors, or Q/DQ nodes for INT8): TensorRT 11 and TensorRT-RTX build strongly
typed networks; on TensorRT 10 ``--precision fp16`` may also turn an fp32 ONNX into an fp16 engine with the FP16
builder flag. Anything else the backend cannot honour is refused; an fp32 engine is never built silently.

Writes the engine and a JSON sidecar ``ENGINE.json`` (backend and version, GPU, precision, profiles, IO, build
time), both atomically. Exit codes: 0 built, 1 the parser or builder failed, 2 usage error, refused request or no
usable backend. Building needs no GPU with TensorRT-RTX; running the engine does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from repvgg_tools.io.paths import CheckpointError, check_outputs

from .common import EXIT_USAGE, Parser, error, run_command

EXIT_BUILD = 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="repvgg-build-trt", description="Build a TensorRT / TensorRT-RTX engine from an ONNX model.")
    p.add_argument("--onnx", required=True, help="ONNX model (from repvgg-export)")
    p.add_argument("--engine", required=True, help="engine file to write (plus ENGINE.json)")
    p.add_argument("--min-batch", type=int, help="smallest batch of the profile (default 1)")
    p.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default 8)")
    p.add_argument("--max-batch", type=int, help="largest batch of the profile (default 32)")
    p.add_argument("--workspace-mb", type=int, help="workspace memory pool limit in MiB")
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache to read (if present) and update (GPU only: "
                   "without one nothing is timed)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "tensorrt_rtx"), default="auto",
                   help="auto: TensorRT if it imports, else TensorRT-RTX")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"), default="auto",
                   help="engine precision; auto (default) takes the ONNX's")
    p.add_argument("--tf32", action="store_true", help="allow TF32 math in fp32 layers")
    p.add_argument("--force", action="store_true", help="overwrite the engine and its sidecar")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose build log")
    return p


def _path_error(args: argparse.Namespace, engine: Path, sidecar: Path) -> str | None:
    """The first problem with the given paths, checked before the heavy imports so that mistakes fail fast."""
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        return f"{onnx_path}: no such file"
    try:  # the timing cache is read and rewritten: it may exist, but is neither the ONNX nor an output
        check_outputs({"--engine": engine, "sidecar": sidecar}, (onnx_path,), args.force,
                      updated={"--timing-cache": args.timing_cache})
    except CheckpointError as exc:
        return str(exc)
    if args.workspace_mb is not None and args.workspace_mb < 1:
        return "--workspace-mb must be at least 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    engine = Path(args.engine)
    sidecar = engine.with_name(engine.name + ".json")
    problem = _path_error(args, engine, sidecar)
    if problem:
        error(problem)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from repvgg_tools.export.tensorrt import BackendUnavailable, BuildFailed, build_engine
    from repvgg_tools.io.checkpoint import atomic_write

    try:
        cache_path = Path(args.timing_cache) if args.timing_cache else None
        cache_in = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else None
        data, info, cache_out = build_engine(
            args.onnx, backend=args.backend, precision=args.precision, min_batch=args.min_batch,
            opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_mb=args.workspace_mb,
            timing_cache=cache_in, use_timing_cache=cache_path is not None, tf32=args.tf32, verbose=args.verbose,
        )
        info["engine"] = str(engine)
        atomic_write(engine, lambda tmp: Path(tmp).write_bytes(data), force=args.force)
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(text), force=args.force)
        if cache_path is not None and cache_out:
            atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(cache_out), force=True)
    except BackendUnavailable as exc:
        error(exc)
        return EXIT_USAGE
    except BuildFailed as exc:
        error(exc)
        return EXIT_BUILD
    profile = next(iter(info["profiles"][0].values()), None)
    batches = f"batch {profile['min'][0]}/{profile['opt'][0]}/{profile['max'][0]}" if profile else "no inputs"
    typing = "strongly typed" if info["strongly_typed"] else "builder flags " + ",".join(info["builder_flags"])
    print(f"built {engine} ({len(data) / 2**20:.2f} MiB) with {info['backend']} {info['version']}: "
          f"{info['precision']} ({typing}), {batches}, GPU {info['gpu'] or 'none'}, {info['build_seconds']:.2f} s; "
          f"sidecar {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
