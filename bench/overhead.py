"""Agent overhead on the reference model: `python bench/overhead.py [--steps N] [--json]`.

The same as `gradmon bench`; see gradmon/tools/bench.py for what is measured and how.
"""

from __future__ import annotations

import argparse

from gradmon.tools.bench import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    main(steps=args.steps, as_json=args.json)
