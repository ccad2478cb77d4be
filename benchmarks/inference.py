"""Inference speed, rnnkit eager vs torch.nn vs ONNX Runtime (see rnnkit/bench_inference.py).

    PYTHONPATH=. python benchmarks/inference.py                 # the full grid (LSTM, GRU; N 1/8/32; H 64/256/512)
    PYTHONPATH=. python benchmarks/inference.py --small         # what `rnnkit bench` runs by default
    PYTHONPATH=. python benchmarks/inference.py --json infer.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnnkit.bench_inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
