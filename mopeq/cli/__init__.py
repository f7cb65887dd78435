"""``python -m mopeq``: headless commands over the same library functions the app uses.

User errors (``MopeqError``, a missing file) print one line to stderr and exit 2; ``--debug``
shows the traceback instead; anything else is a bug and keeps its traceback. Every command
builds a ``RunSpec`` and calls a ``Workspace`` stage (``commands``); the option defaults are
``RunSpec``'s (``options``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mopeq.cli import commands as C
from mopeq.cli import options as O
from mopeq.core.errors import MopeqError

USER_ERRORS: tuple[type[BaseException], ...] = (MopeqError, FileNotFoundError)

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {  # name: (help, parser builder, run)
    "inspect": ("show the MoE layout of a model", O.inspect_parser, C.cmd_inspect),
    "train-tiny": ("train the embedded tiny MoE VLM", O.train_tiny_parser, C.cmd_train_tiny),
    "evaluate": ("quick MME evaluation", O.evaluate_parser, C.cmd_evaluate),
    "profile": ("per-expert sensitivity scores", O.profile_parser, C.cmd_profile),
    "allocate": ("bits per expert from scores", O.allocate_parser, C.cmd_allocate),
    "memory": ("memory estimate of a bit map", O.memory_parser, C.cmd_memory),
    "quantize": ("quantize per expert with auto-round and export", O.quantize_parser,
                 C.cmd_quantize),
    "study": ("compare MoPEQ, baselines and auto-round AutoScheme", O.study_parser, C.cmd_study),
    "sensitivity-report": ("rank every sensitivity method against the measured ground truth",
                           O.sensitivity_report_parser, C.cmd_sensitivity_report),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="mopeq", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (text, build, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        build(sp)
        sp.set_defaults(func=run)
    return p


def _config_of(args) -> dict:
    """``--model``'s config.json as a dict ({} when it is not a local folder)."""
    path = Path(getattr(args, "model", "") or "") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        msg = exc.args[0] if exc.args else type(exc).__name__
        print(f"mopeq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:
        from mopeq.model.loading import is_remote_code_error, remote_code_failure

        if args.debug or not is_remote_code_error(exc):
            raise
        print(f"mopeq {args.command}: error: {remote_code_failure(_config_of(args), exc)}",
              file=sys.stderr)
        return 2
    finally:
        if args.debug:
            print(f"[{args.command} took {time.perf_counter() - start:.2f} s]", file=sys.stderr)
