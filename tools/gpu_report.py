#!/usr/bin/env python
"""``repvgg-gpu-report`` from a checkout without installing: ``PYTHONPATH=. python tools/gpu_report.py --help``.

The code is repvgg_tools/cli/gpu_report.py.
"""

from repvgg_tools.cli.gpu_report import main

if __name__ == "__main__":
    raise SystemExit(main())
