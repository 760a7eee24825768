"""Train a RepVGG/VGG model from a YAML recipe, with ``key=value`` overrides; works under torchrun.

Examples:
    repvgg-train --recipe recipes/digits_quickstart.yaml
    repvgg-train --recipe recipes/repvgg_imagenet_120e.yaml data.train_dir=/data/train \\
        data.val_dir=/data/val model.arch=repvgg_a0 output=runs/a0
    torchrun --nproc_per_node 8 -m repvgg_tools.cli.train --recipe recipes/repvgg_imagenet_200e_aug.yaml amp=bf16 ...
    repvgg-train --recipe recipes/repvgg_imagenet_120e.yaml resume=runs/a0/last.pth ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .common import Parser, error, run_command


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="repvgg-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. epochs=2")
    parser.add_argument("--print-recipe", action="store_true", help="print the full recipe as JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:

    from repvgg_tools.io.checkpoint import CheckpointError
    from repvgg_tools.training import RecipeError, load_recipe, train

    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if args.quiet or rank else logging.INFO
    logging.basicConfig(level=level, format=f"[rank {rank}] %(message)s" if "RANK" in os.environ else "%(message)s")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            print(json.dumps(recipe, indent=2))
            return 0
        result = train(recipe)
    except (RecipeError, CheckpointError, ValueError) as exc:
        error(exc)
        return 2
    if rank == 0 and result["last"] is not None:
        print(f"done: best val top-1 {result['best_top1']:.2f}%, checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
