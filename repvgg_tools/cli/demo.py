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

from ..bench.demo import evaluate, plot, print_table
from .common import Parser, error, run_command

ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes/ and the default demo_out/

RECIPE = ROOT / "recipes" / "digits_quickstart.yaml"
MIN_ACCURACY = 95.0


def run(cmd: list[str], what: str) -> None:
    """Run one pipeline step as its own process (the real CLIs), echoing the command; stop on failure."""
    print(f"\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    if subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode:
        raise SystemExit(f"error: {what} failed (see above)")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="repvgg-demo", description=__doc__.split("\n")[0], epilog=__doc__,
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
    run([py, "-m", "repvgg_tools.cli.train", "--recipe", RECIPE, *overrides], "training")
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
