"""minibloom vs transformers on a random bloom-560m-shaped checkpoint: ``python benchmarks/bench.py [--rounds N]``.

The benchmark is ``minibloom.bench`` (also ``minibloom bench``); this script only runs it from a clone.
"""

from minibloom.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
