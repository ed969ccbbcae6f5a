"""Conventions shared by every command-line entry point (``docs/reliability.md``, "Errors and exit statuses").

* ``--help`` answers at once: torch, transformers, open3d, timm and webdataset are imported after
  the arguments are parsed (``tests/reliability/test_reliability_cli.py`` checks every script).
* Bad arguments: one line ``<prog>: error: <what> (see --help)`` on stderr and exit status 2
  (:class:`ArgumentParser`; argparse's own status for usage errors).
* User errors — a missing, unreadable or corrupt input, an invalid config value, an unsafe
  checkpoint, a full disk — print ``error: <message>`` on stderr without a traceback and exit with
  status 2, unless the tool documents its own status (``pretrain/train.py``: 1 for configuration
  and checkpoint errors). ``--debug`` (accepted by every entry point) or ``DINODEPTH_DEBUG=1`` shows
  the traceback instead.
* Anything else is a bug: Python's traceback, exit status 1.

A script uses it as ``sys.exit(run_main(main))``; inside ``main``, ``return fail(exc)`` reports an
error the script caught itself (re-raised under ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USAGE = 2  # bad arguments and user errors (argparse's status for usage errors)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "DINODEPTH_DEBUG"

_debug = False


class UserError(Exception):
    """An error the user can fix (bad input, missing file): reported in one message, no traceback."""


def debug_enabled() -> bool:
    """True under ``--debug`` (set by :func:`run_main`) or ``DINODEPTH_DEBUG=1``."""
    return _debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def strip_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (options after a ``--`` separator are left alone) and whether it was there."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    found = DEBUG_FLAG in args[:end]
    return [a for i, a in enumerate(args) if not (i < end and a == DEBUG_FLAG)], found


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (status 2) and the ``--debug`` flag in ``--help``.

    Subparsers inherit the class. ``--debug`` itself is removed from the command line by
    :func:`run_main` before parsing, so it never reaches the namespace.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                              help="show the full traceback of an error (also: DINODEPTH_DEBUG=1)")

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; one line says the same and fits in a log.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def error_message(exc: BaseException) -> str:
    """What :func:`fail` prints: the exception's message, or its type when the message is empty."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def label_path(text: str) -> tuple[str, str]:
    """argparse ``type`` of ``LABEL=PATH`` options (the path may itself contain ``=``: the last one splits)."""
    label, sep, path = text.rpartition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, path


def fail(exc: BaseException, status: int = EXIT_USAGE) -> int:
    """Report a user error caught by a script: ``error: <message>`` on stderr, return ``status``.

    Under ``--debug`` the exception is raised again, so Python prints its traceback.
    """
    if debug_enabled():
        raise exc
    print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
    return status


def preparse(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None = None) -> None:
    """Parse the command line once before a script's heavy imports (``--help``, argument errors).

    Returns quietly when the arguments parse; the script's ``main`` parses them again afterwards.
    """
    args, _ = strip_debug_flag(sys.argv[1:] if argv is None else argv)
    build_parser().parse_args(args)


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
             user_errors: tuple[type[BaseException], ...] = (), status: int = EXIT_USAGE) -> int:
    """Run a script's ``main(argv)`` under the conventions above; returns its exit status.

    ``user_errors``: further exception types that are user errors for this script (besides
    :class:`UserError`, :class:`shared.config.ConfigError` and :class:`OSError`), reported with
    ``status``. ``SystemExit`` (argparse) passes through unchanged.
    """
    global _debug
    args, found = strip_debug_flag(sys.argv[1:] if argv is None else argv)
    _debug = _debug or found
    expected: tuple[type[BaseException], ...] = (UserError, OSError, *user_errors)
    try:
        from shared.config import ConfigError

        expected += (ConfigError,)
    except ImportError:  # shared.sysdeps runs before the dependencies may be installed
        pass
    try:
        code = main(args)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except expected as exc:
        return fail(exc, status)
    return 0 if code is None else int(code)
