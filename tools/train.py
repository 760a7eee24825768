#!/usr/bin/env python
"""``repvgg-train`` from a checkout without installing: ``PYTHONPATH=. python tools/train.py --help``.

The code is repvgg_tools/cli/train.py.
"""

from repvgg_tools.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
