"""The examples run (tiny settings) and learn."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_truncated_bptt_example_learns():
    losses = _load("truncated_bptt").main(steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_lengths_classifier_example_beats_chance():
    assert _load("lengths_classifier").main(steps=40) > 0.6
