"""Forward+backward of the fused backend against torch.nn, idle and with K busy processes
(the module is rnnkit/fused/under_load.py; ``rnnkit bench --contended`` runs its S and M rows).

    PYTHONPATH=$PWD python benchmarks/under_load.py                # K = 3 busy processes
    PYTHONPATH=$PWD python benchmarks/under_load.py --busy 1 --samples 21 --json out.json
    PYTHONPATH=$PWD python benchmarks/under_load.py --configs rnn_s,gru_s --threads 1
"""

import sys

from rnnkit.fused.under_load import main

if __name__ == "__main__":
    sys.exit(main())
