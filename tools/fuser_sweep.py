"""Run the graph fuser over many networks nobody wrote it for (torchvision and timm), and check each result.

For every model: random weights with randomized BatchNorm statistics, in float64, ``graph_fuse`` on one input, then
the fused model against the original on a batch of two (max|a-b|/max|b| in float64, held to the graph fuser's own
tolerance, ``repvgg_tools.contract.GRAPH_FUSER_RTOL``: a correct fusion is exact up to float64 rounding). The
report gives the sub-graphs fused, the BatchNorms left (and why, from the fuser's report), the modules it could not
trace, the class kept and the time.
Exits 1 if any model raises or misses the tolerance.

    python tools/fuser_sweep.py                                  # the default zoo, 96x96 inputs
    python tools/fuser_sweep.py --models tv:resnet18 timm:mobileone_s0 --size 64 --out sweep
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from repvgg_tools.cli.common import Parser, run_command
from repvgg_tools.contract import GRAPH_FUSER_RTOL as RTOL
from repvgg_tools.io.errors import one_line

DEFAULT_MODELS = [
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:regnet_x_400mf", "tv:shufflenet_v2_x0_5",
    "tv:densenet121", "tv:mnasnet0_5", "tv:convnext_tiny", "tv:googlenet", "tv:vgg11_bn",
    "timm:resnet18d", "timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:regnety_002", "timm:dla34",
    "timm:hrnet_w18_small", "timm:cspresnet50", "timm:rexnet_100", "timm:ghostnet_100", "timm:repvit_m0_9",
    "timm:mobilevit_xxs", "timm:efficientvit_b0", "timm:dpn68", "timm:res2net50_14w_8s", "timm:tf_mixnet_s",
    "timm:vovnet39a", "timm:gernet_s", "timm:resnest14d", "timm:poolformer_s12", "timm:lcnet_050",
    "timm:mobileone_s0", "timm:fastvit_t8", "timm:repvgg_a0", "timm:repghostnet_050",
]


def build(spec: str):
    """``tv:name`` (torchvision) or ``timm:name``, random weights."""
    source, _, name = spec.partition(":")
    if source == "tv":
        import torchvision.models as tvm

        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return tvm.get_model(name, weights=None, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False)


def sweep_one(spec: str, size: int) -> dict:
    import torch

    from repvgg_tools import randomize_batchnorm
    from repvgg_tools.contract import max_errors
    from repvgg_tools.fx.fuser import graph_fuse

    torch.manual_seed(0)
    model = randomize_batchnorm(build(spec), seed=1).eval().double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    start = time.perf_counter()
    fused, report = graph_fuse(model, (x[:1],))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ours, ref = fused(x), model(x)
    ours, ref = (v[0] if isinstance(v, (tuple, list)) else v for v in (ours, ref))
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return {"fused": len(report.fused), "bn_before": sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                          for m in model.modules()),
            "bn_left": bns, "not_traced": len(report.skipped), "class_kept": type(fused) is type(model),
            "max_rel": max_errors(ours, ref)[1], "seconds": seconds,
            "unfused": sorted({why.split(":", 1)[-1].strip()[:100] for _, why in report.unfused})[:4]}


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SOURCE:NAME",
                   help=f"tv:NAME (torchvision) or timm:NAME; default: a zoo of {len(DEFAULT_MODELS)}")
    p.add_argument("--size", type=int, default=96, help="input height and width (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--out", type=Path, help="also write sweep.json and sweep.md into this folder")
    p.add_argument("--force", action="store_true", help="overwrite sweep.json and sweep.md in --out")
    args = p.parse_args(argv)
    return run_command(lambda: _main(args, p), traceback=args.traceback)


def _main(args: argparse.Namespace, p: Parser) -> int:
    bad = [s for s in args.models if s.partition(":")[0] not in ("tv", "timm") or not s.partition(":")[2]]
    if bad:
        p.error(f"--models: {', '.join(bad)}: write tv:NAME or timm:NAME")
    if args.size < 32:
        p.error("--size must be at least 32")
    if args.out and not args.force and any((args.out / n).exists() for n in ("sweep.json", "sweep.md")):
        p.error(f"{args.out}: holds a sweep already (use --force to overwrite)")
    import torch

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # the report carries what the fuser's warnings say
    rows, failed = {}, []
    for spec in args.models:
        try:
            rows[spec] = sweep_one(spec, args.size)
            ok = rows[spec]["max_rel"] <= RTOL
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row of the report, not the end of it
            rows[spec] = {"error": f"{type(exc).__name__}: {one_line(exc, 180)}"}
            ok = False
        if not ok:
            failed.append(spec)
        r = rows[spec]
        print(f"{spec}: " + (r["error"] if "error" in r else
              f"fused {r['fused']}, BN {r['bn_before']} -> {r['bn_left']}, not traced {r['not_traced']}, "
              f"class kept {r['class_kept']}, max rel {r['max_rel']:.1e}, {r['seconds']:.2f} s")
              + ("" if ok else "  FAILED"), flush=True)
    if args.out:
        from repvgg_tools.io.checkpoint import atomic_write

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)),
                     force=True)
        lines = ["| model | fused | BN before -> left | not traced | class kept | max rel | s |",
                 "|---|---|---|---|---|---|---|"]
        for spec, r in rows.items():
            lines.append(f"| {spec} | error: {r['error']} |" if "error" in r else
                         f"| {spec} | {r['fused']} | {r['bn_before']} -> {r['bn_left']} | {r['not_traced']} | "
                         f"{r['class_kept']} | {r['max_rel']:.1e} | {r['seconds']:.2f} |")
        atomic_write(args.out / "sweep.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), force=True)
    print(f"{len(rows) - len(failed)} of {len(rows)} models fused and within {RTOL:g}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
