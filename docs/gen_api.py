"""Write docs/api.md: every public name in ``rnnkit.__all__`` with its signature and
the first line of its docstring.

    PYTHONPATH=. python docs/gen_api.py           # rewrite docs/api.md
    PYTHONPATH=. python docs/gen_api.py --check   # exit 1 if docs/api.md is out of date

tests/test_api_docs.py runs the check, so the page cannot go stale: a new or
renamed public name, a changed signature or docstring means running this again.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"

# the sections of the page, each a list of names in rnnkit.__all__ (a name not listed here goes to "Other")
SECTIONS = [
    ("Layers and cells (torch.nn's)", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RecurrentBase"]),
    ("The cell zoo", ["LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM", "IndRNN", "LayerNormLSTMCell",
                      "LayerNormGRUCell", "PeepholeLSTMCell", "IndRNNCell", "ConvLSTM", "ConvLSTM1d", "ConvLSTM2d",
                      "ConvLSTM3d", "ConvGRU", "ConvGRU1d", "ConvGRU2d", "ConvGRU3d", "ConvLSTMCell",
                      "ConvLSTM1dCell", "ConvLSTM2dCell", "ConvLSTM3dCell", "ConvGRUCell", "ConvGRU1dCell",
                      "ConvGRU2dCell", "ConvGRU3dCell", "MinGRU", "MinLSTM", "MinGRUCell", "MinLSTMCell"]),
    ("Shapes, streaming and sequences", ["explain", "Explanation", "Stream", "StreamingStep", "chunk_lengths", "detach_state",
                                         "reset_state", "lengths_to_mask", "pack_padded_sequence", "pack_sequence",
                                         "pad_packed_sequence", "pad_sequence", "unpad_sequence"]),
    ("Backends and the layer registry", ["BACKENDS", "describe_backends", "LAYERS", "LayerEntry", "get_layer",
                                         "register_layer", "CellSpec"]),
    ("Version", ["__version__"]),
]


class _Annotation:
    """An annotation written as a string (``from __future__ import annotations``), shown without quotes."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _markdown(text: str) -> str:
    """reST inline markup to Markdown: ``x`` and :class:`x` become `x`."""
    text = re.sub(r":(?:class|func|meth|attr|data|mod):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _summary(obj) -> str:
    """The docstring's first line: its first paragraph, which may wrap over several source lines."""
    doc = inspect.getdoc(obj) or ""
    return _markdown(" ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines()))


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{'class ' if inspect.isclass(obj) else ''}rnnkit.{name}"
    params = [p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str) else p
              for p in sig.parameters.values()]
    ret = sig.return_annotation
    if inspect.isclass(obj):
        ret = inspect.Signature.empty  # __init__'s "-> None"
    sig = sig.replace(parameters=params, return_annotation=_Annotation(ret) if isinstance(ret, str) else ret)
    kind = "class " if inspect.isclass(obj) else ""
    return _wrap(f"{kind}rnnkit.{name}" + re.sub(r" at 0x[0-9a-f]+", "", str(sig)))  # function defaults print an address


def _wrap(line: str, width: int = 100) -> str:
    """Break a long signature after the top-level commas of its parameter list, lines under ``width``."""
    if len(line) <= width:
        return line
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 1:
            parts.append(line[start:i + 1])
            start = i + 2
    parts.append(line[start:])
    out, current = [], parts[0]
    for part in parts[1:]:
        if len(current) + 1 + len(part) > width:
            out.append(current)
            current = "        " + part
        else:
            current += " " + part
    return "\n".join(out + [current])


def _entry(name: str, obj, public: dict) -> str:
    title = f"### `rnnkit.{name}`\n\n"
    if inspect.isclass(obj) or inspect.isroutine(obj):
        real = getattr(obj, "__name__", name)
        module = getattr(obj, "__module__", "") or ""
        if real != name and public.get(real) is obj:
            return title + f"Alias of [`rnnkit.{real}`](#rnnkit{real.lower()}).\n"
        if not module.startswith("rnnkit"):
            # torch's own function: its signature and text change with the torch version, so only the link
            return title + f"`{module}.{real}`, re-exported unchanged: see torch's documentation.\n"
        return title + f"```python\n{_signature(name, obj)}\n```\n\n{_summary(obj) or '(no docstring)'}\n"
    if isinstance(obj, dict):
        keys = ", ".join(f"`{k}`" for k in obj)
        values = " / ".join(sorted({f"`{type(v).__name__}`" for v in obj.values()}))
        return title + f"A `dict` of {values} by name: {keys}.\n"
    return title + f"`{type(obj).__name__}`: `{obj!r}`.\n"


def render() -> str:
    import rnnkit

    public = {name: getattr(rnnkit, name) for name in rnnkit.__all__}
    listed = [n for _, names in SECTIONS for n in names]
    unknown = [n for n in listed if n not in public]
    if unknown:
        raise SystemExit(f"docs/gen_api.py lists names that are not in rnnkit.__all__: {unknown}")
    sections = SECTIONS + [("Other", [n for n in rnnkit.__all__ if n not in listed])]
    out = ["# API reference", "",
           "Every public name of `rnnkit` (`rnnkit.__all__`), with its signature and the first line of its "
           "docstring.", "Generated by `PYTHONPATH=. python docs/gen_api.py`; `tests/test_api_docs.py` fails when "
           "this page is out of date.", "The guides: [README](../README.md), [cells.md](cells.md), "
           "[conv_and_minimal.md](conv_and_minimal.md), [fused.md](fused.md), [cli.md](cli.md).", ""]
    for title, names in sections:
        if not names:
            continue
        out += [f"## {title}", ""]
        for name in names:
            out += [_entry(name, public[name], public)]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from a fresh render")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = render()
    if args.check:
        if API_MD.exists() and API_MD.read_text() == text:
            return 0
        print(f"{os.path.relpath(API_MD)} is out of date: run PYTHONPATH=. python docs/gen_api.py", file=sys.stderr)
        return 1
    API_MD.write_text(text)
    print(f"wrote {API_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
