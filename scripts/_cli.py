"""Shared plumbing for the thin entry points: import path, `--config FILE key=value...` parsing, error mapping.

A `UserError` (bad config, CLI, data or checkpoint) prints one line `error: ...` to stderr and exits 2, without a
traceback; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# the repo root goes first even when PYTHONPATH already lists it: later, `import train` would find scripts/train.py
if str(ROOT) in sys.path:
    sys.path.remove(str(ROOT))
sys.path.insert(0, str(ROOT))

from train.errors import UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep it to one line
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(description=description)
    parser.add_argument("--config", required=config_required, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.ffn.type=moe")
    return parser


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
