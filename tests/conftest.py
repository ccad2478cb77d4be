"""Session-wide settings for the test suite.

``backend="auto"`` measures fused vs torch on the machine it runs on (rnnkit/fused/calibrate.py),
so its choices depend on the machine and its load. The suite runs with measuring off
(``RNNKIT_AUTO_MEASURE=0``: the shipped auto_table.json decides), so the tests that assume the
shipped table's choices are deterministic; tests/test_auto_calibrate.py turns measuring on
where it tests it. Export ``RNNKIT_AUTO_MEASURE=1`` to run the suite with measuring on anyway.
The cache folder is a private temporary one, so no test reads or writes ~/.cache/rnnkit.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("RNNKIT_AUTO_MEASURE", "0")
if "RNNKIT_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rnnkit-test-cache-")
    os.environ["RNNKIT_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
