"""The kernel benchmark as a script; the harness lives in `attnhub.bench` (also `python -m attnhub bench`).

    python benchmarks/bench_attention.py --out benchmarks/results/h100.json --plot benchmarks/results/h100.png
    python benchmarks/bench_attention.py --help
"""

import sys

from attnhub.bench import main, run  # noqa: F401 - importable: bench_attention.run(shapes, passes, impls, ...)

if __name__ == "__main__":
    sys.exit(main())
