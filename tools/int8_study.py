#!/usr/bin/env python
"""``repvgg-int8-study`` from a checkout without installing: ``PYTHONPATH=. python tools/int8_study.py --help``.

The code is repvgg_tools/cli/int8_study.py.
"""

from repvgg_tools.cli.int8_study import main

if __name__ == "__main__":
    raise SystemExit(main())
