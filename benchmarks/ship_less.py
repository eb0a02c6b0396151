"""Ship LESS kernels with the package: copy a run's kernels into ``src/namm/checkpoints/less/NAME``,
stored in float16 by default (half the bytes; they load back as float32).

    python benchmarks/ship_less.py runs/less-smollm2-135m-h2o-h512-mix32-e2e --name smollm2-135m-h2o

The sidecar keeps the run's provenance and adds where the kernels came from and how they are stored.
Measure the shipped file (``--less NAME``) before quoting it: rounding to float16 changes the weights.
"""

from __future__ import annotations

import argparse

from namm.less.checkpoint import SHIPPED_DIR, load_less_kernels, read_metadata, save_less_kernels
from namm.models import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="LESS kernels: a run folder, a .safetensors file or a shipped name")
    parser.add_argument("--name", required=True, help="name to ship them under (e.g. smollm2-135m-h2o)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype (default float16)")
    args = parser.parse_args()
    kernels = load_less_kernels(args.source)
    provenance = {**read_metadata(args.source)["provenance"], "shipped_from": args.source, "stored_dtype": args.dtype}
    path = save_less_kernels(SHIPPED_DIR / f"{args.name}.safetensors", kernels, provenance, DTYPES[args.dtype])
    print(f"shipped {args.source} as {args.name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
