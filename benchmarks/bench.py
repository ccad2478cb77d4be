"""The rnnkit benchmark: the same as ``rnnkit bench`` (see ``rnnkit bench --help``).

    PYTHONPATH=. python benchmarks/bench.py --cell lstm --size S --json bench.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnnkit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
