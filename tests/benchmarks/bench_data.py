"""Data-loading benchmark: ``python tests/benchmarks/bench_data.py [--images N] [--size S] [--workers W]``.

The implementation lives in :mod:`kd_cluster.bench.data` so the installed CLI (``kd-cluster bench data``)
can call :func:`run` too; this file is the command-line entry point and the benchmark's home in tests/.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kd_cluster.bench.data import format_table, run

__all__ = ["format_table", "main", "run"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print the table (and JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=800, help="train images to generate")
    p.add_argument("--size", type=int, default=224, help="output side length")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: number of cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-side", type=int, default=320, help="also on images re-encoded to this longer side (0: off)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = p.parse_args(argv)
    result = run(n_images=args.images, size=args.size, workers=args.workers, batch_size=args.batch_size,
                 max_side=args.max_side or None)
    if args.json:
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
