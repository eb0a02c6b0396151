"""Runtime benchmark on the embedded model: ``python benchmarks/bench_runtime.py [namm bench options]``.

Same as ``namm bench``; kept here beside the other benchmarks."""

import sys

from namm.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
