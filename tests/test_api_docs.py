"""docs/api.md is what docs/gen_api.py writes now: every public name, its signature and
docstring summary. When this fails, run ``PYTHONPATH=. python docs/gen_api.py``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import rnnkit

ROOT = Path(__file__).resolve().parent.parent


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_page_is_up_to_date():
    page = (ROOT / "docs" / "api.md").read_text()
    assert page == _gen_api().render(), "docs/api.md is out of date: run PYTHONPATH=. python docs/gen_api.py"


def test_api_page_lists_every_public_name():
    page = (ROOT / "docs" / "api.md").read_text()
    for name in rnnkit.__all__:
        assert f"### `rnnkit.{name}`\n" in page, name


def test_readme_names_the_layers_demo_cell_takes():
    """The README lists the layers `rnnkit demo --cell` takes: the registered ones with vector inputs."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"`--cell` takes any layer with vector inputs \((.*?);", readme, re.S)
    assert match, "README: the --cell sentence moved"
    listed = re.findall(r"`(\w+)`", match.group(1))
    assert listed == [name for name, entry in rnnkit.LAYERS.items() if not entry.spatial]
