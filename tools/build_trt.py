#!/usr/bin/env python
"""``repvgg-build-trt`` from a checkout without installing: ``PYTHONPATH=. python tools/build_trt.py --help``.

The code is repvgg_tools/cli/build_trt.py.
"""

from repvgg_tools.cli.build_trt import main

if __name__ == "__main__":
    raise SystemExit(main())
