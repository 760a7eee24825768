#!/usr/bin/env python
"""``repvgg-demo`` from a checkout without installing: ``PYTHONPATH=. python tools/demo.py --help``.

The code is repvgg_tools/cli/demo.py.
"""

from repvgg_tools.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
