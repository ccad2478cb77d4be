"""The default ONNX exporter's models of tests/test_onnx.py, exported in a process of their own.

torch's default (torch.export based) exporter takes 3-8 s of CPU per layer here (tracing each
layer-direction's ``scan`` several times), about 100 s for every layer: run inline, that would make
the suite a third longer. conftest.py starts this script when the session has collected a test that
reads its files; it runs on the core the suite's (mostly single-threaded) tests leave idle, and the
module fixture ``exported`` of test_onnx.py waits for it (and fails with its log if it failed), checks
that its models hold the same weights as the ones built in the test process, and runs the files in
ONNX Runtime against eager there. Nothing is cached between sessions.

Usage: ``python tests/onnx_export_worker.py OUT_DIR`` writes, for each group of :data:`test_onnx.WORKER`,
``<name>.onnx`` and ``<name>.pt`` (the model's state_dict), then ``done``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: str) -> int:
    import torch

    torch.set_num_threads(1)  # the other core runs the suite
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_onnx

    folder = Path(out)
    for name, (make, example) in test_onnx.WORKER.items():
        model = make()
        test_onnx._export(model, "dynamo", str(folder / f"{name}.onnx"), example)
        torch.save(model.state_dict(), folder / f"{name}.pt")
        print(f"exported {name}", flush=True)
    (folder / "done").write_text("ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
