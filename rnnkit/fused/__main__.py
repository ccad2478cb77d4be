"""``python -m rnnkit.fused build`` compiles the extension ahead of time;
``python -m rnnkit.fused info`` says whether the fused backend is ready."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnkit.fused", description=__doc__)
    parser.add_argument("command", choices=["build", "info"])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's command lines")
    args = parser.parse_args(argv)
    from . import _build
    if args.command == "build":
        start = time.perf_counter()
        reason = _build.load(verbose=args.verbose)
        if reason is not None:
            print(f"rnnkit.fused: not built: {reason}", file=sys.stderr)
            return 1
        print(f"rnnkit.fused: ready ({_build._state['path'] or 'already loaded'}; {time.perf_counter() - start:.1f} s)")
        return 0
    print(json.dumps(_build.info(), indent=1))
    return 0 if _build.load() is None else 1


if __name__ == "__main__":
    sys.exit(main())
