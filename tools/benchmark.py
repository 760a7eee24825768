#!/usr/bin/env python
"""``repvgg-benchmark`` from a checkout without installing: ``PYTHONPATH=. python tools/benchmark.py --help``.

The code is repvgg_tools/cli/benchmark.py.
"""

from repvgg_tools.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
