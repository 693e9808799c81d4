"""``python -m benchmarks``: see :mod:`benchmarks.run` and docs/benchmarks.md."""

import sys

from .run import main

sys.exit(main())
