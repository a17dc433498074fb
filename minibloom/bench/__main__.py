"""``python -m minibloom.bench``: the benchmark (``minibloom.bench.main``), also its worker processes."""

import sys

from minibloom.bench import main

sys.argv[0] = "python -m minibloom.bench"  # argparse's name for the usage line, instead of __main__.py
sys.exit(main())
