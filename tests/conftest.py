"""Session-wide settings for the test suite.

``backend="auto"`` measures fused vs torch on the machine it runs on (rnnkit/fused/calibrate.py),
so its choices depend on the machine and its load. The suite runs with measuring off
(``RNNKIT_AUTO_MEASURE=0``: the shipped auto_table.json decides), so the tests that assume the
shipped table's choices are deterministic; tests/test_auto_calibrate.py turns measuring on
where it tests it. Export ``RNNKIT_AUTO_MEASURE=1`` to run the suite with measuring on anyway.
The cache folder is a private temporary one, so no test reads or writes ~/.cache/rnnkit.

When the session has collected a test of tests/test_onnx.py that reads the default exporter's
models, tests/onnx_export_worker.py exports them in a process of its own from the start of the
session (see that file); the session's end stops it if it is still running and removes its folder.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RNNKIT_AUTO_MEASURE", "0")
if "RNNKIT_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rnnkit-test-cache-")
    os.environ["RNNKIT_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)


def pytest_collection_finish(session):
    if not any(item.path.name == "test_onnx.py" and "dynamo" in item.name for item in session.items):
        return
    folder = tempfile.mkdtemp(prefix="rnnkit-onnx-worker-")
    log = os.path.join(folder, "log.txt")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("onnx_export_worker.py")), folder],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    session.config.rnnkit_onnx_worker = (proc, folder, log)


def pytest_sessionfinish(session):
    job = getattr(session.config, "rnnkit_onnx_worker", None)
    if job is not None:
        proc, folder, _ = job
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
