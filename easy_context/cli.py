"""What every command-line script of the project shares: validated options, one-line errors, bounded waits.

* :class:`Parser` is an ``argparse.ArgumentParser`` whose ``--help`` shows every default and every numeric range,
  whose errors are one line on stderr (exit code 2, printed once under a multi-process launcher), and which accepts
  each option with underscores as well as dashes (EasyContext's ``--parallel_mode``, ``--max_context_length``...).
* :func:`int_range` / :func:`float_range` are argparse ``type=`` checkers that name the allowed range.
* :class:`UserError` is a mistake the user can fix; :func:`install_error_handler` turns it, and a timed-out or broken
  collective, into one line on stderr and an exit code instead of a traceback.

The option names shared by the scripts are listed in docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from typing import Callable, Optional

__all__ = ["Parser", "int_range", "float_range", "UserError", "user_errors", "install_error_handler", "print_error",
           "is_main",
           "EXIT_USAGE", "EXIT_DISTRIBUTED", "DEFAULT_DIST_TIMEOUT"]

#: Exit code of a user error (argparse's own).
EXIT_USAGE = 2
#: Exit code when another process stalled or died (a collective timed out or lost its peer).
EXIT_DISTRIBUTED = 3
#: Seconds a collective may wait for the other processes (``--dist-timeout``): long enough for a checkpoint save or
#: a slow step, far below gloo's 30 minutes.
DEFAULT_DIST_TIMEOUT = 600.0


def is_main() -> bool:
    """Whether this is the global rank 0 (or a process started without a launcher)."""
    return os.environ.get("RANK", "0") == "0"


def print_error(prog: str, message: str, *, everywhere: bool = False) -> None:
    """``<prog>: error: <message>`` as one line on stderr; only on rank 0 unless ``everywhere``."""
    if not (everywhere or is_main()):
        return
    rank = os.environ.get("RANK", "0")
    who = f"{prog} [rank {rank}]" if everywhere and rank != "0" else prog
    line = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stdout.flush()
    # sys.__stderr__: torch.distributed's exception hook swaps sys.stderr for a buffer while an earlier hook runs.
    print(f"{who}: error: {line}", file=sys.__stderr__ or sys.stderr, flush=True)


class UserError(Exception):
    """A mistake the user can fix: reported as one line naming the problem and the fix, exit code 2.

    Raise it on every process (the scripts make sure of that by agreeing on decisions taken by one process); the
    line is printed once, by rank 0. With ``everywhere=True`` (an error only some processes may hit) every process
    that raises it prints it.
    """

    def __init__(self, message: str, *, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


# --------------------------------------------------------------------------------------------------------------
# Numeric ranges
# --------------------------------------------------------------------------------------------------------------


def _bounds_text(lo, hi, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}" if not lo_open else f"> {lo} and <= {hi}"
    if lo is not None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"<= {hi}"


def _ranged(kind: Callable, kind_name: str, lo, hi, lo_open: bool):
    text = _bounds_text(lo, hi, lo_open)

    def check(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind_name} {text}, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise argparse.ArgumentTypeError(f"expected a finite number {text}, got {value!r}")
        if (lo is not None and (number <= lo if lo_open else number < lo)) or (hi is not None and number > hi):
            raise argparse.ArgumentTypeError(f"expected {kind_name} {text}, got {value}")
        return number

    check.__name__ = kind_name
    check.range_text = text
    return check


def int_range(lo: Optional[int] = None, hi: Optional[int] = None):
    """``type=`` for an integer in ``[lo, hi]``; the range appears in ``--help``."""
    return _ranged(int, "an integer", lo, hi, False)


def float_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False):
    """``type=`` for a number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); the range appears in ``--help``."""
    return _ranged(float, "a number", lo, hi, lo_open)


# --------------------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------------------


def _help_with_range_and_default(action) -> str:
    """The option's help followed by ``[range ..., default: ...]``."""
    text = action.help or ""
    extra = []
    range_text = getattr(action.type, "range_text", None)
    if range_text:
        extra.append(f"range {range_text}")
    if action.nargs != 0 and action.default is not argparse.SUPPRESS and "%(default)" not in text:
        extra.append("default: %(default)s" if action.default is not None else "default: none")
    return f"{text} [{', '.join(extra)}]".strip() if extra else text


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors, defaults and ranges in ``--help``, and underscore spellings.

    ``--foo_bar`` is read as ``--foo-bar`` whenever the parser knows ``--foo-bar`` (EasyContext spells many options
    with underscores); aliases that differ in more than that are declared with the option.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation silently changes meaning when options are added
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.help != argparse.SUPPRESS:
            action.help = _help_with_range_and_default(action)
        return action

    def error(self, message):  # noqa: D401 - argparse's hook
        print_error(self.prog, f"{message} (see {self.prog} --help)")
        self.exit(EXIT_USAGE)

    def _normalise(self, argv):
        known = set(self._option_string_actions)
        out = []
        for arg in argv:
            if arg == "--":
                out.extend(argv[len(out):])
                break
            if arg.startswith("--") and "_" in arg:
                name, eq, value = arg.partition("=")
                dashed = name.replace("_", "-")
                if name not in known and dashed in known:
                    arg = dashed + eq + value
            out.append(arg)
        return out

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._normalise(argv), namespace)


# --------------------------------------------------------------------------------------------------------------
# Errors at the top level
# --------------------------------------------------------------------------------------------------------------

_TIMEOUT_WORDS = ("timed out", "timeout", "deadline exceeded")
_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
               "socket closed", "end of file")


def _distributed_failure(err: BaseException) -> Optional[str]:
    """``"timeout"`` or ``"peer"`` when ``err`` is a collective that waited too long or lost a process."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - very old torch
        DistError = ()  # noqa: N806
    text = str(err).lower()
    if not isinstance(err, (RuntimeError, DistError)):
        return None
    if any(w in text for w in _TIMEOUT_WORDS):
        return "timeout"
    if any(w in text for w in _PEER_WORDS):
        return "peer"
    return None


@contextlib.contextmanager
def user_errors(*kinds):
    """Inside, ``ValueError`` and a missing file (or ``kinds``) become :class:`UserError` (one line, rank 0)."""
    try:
        yield
    except (kinds or (ValueError, FileNotFoundError)) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(str(err)) from None


_USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def install_error_handler(prog: str, *, dist_timeout: Optional[float] = None,
                          cleanup: Optional[Callable[[], None]] = None) -> None:
    """Report what ends the script as one line on stderr instead of a traceback, and exit at once.

    * :class:`UserError` (printed by rank 0), and a ``ValueError`` / missing file (printed by the process that hit
      it): exit code 2.
    * A collective that timed out (``--dist-timeout``) or lost its peer: the line says so and names the option,
      exit code 3. The process leaves without waiting for the others, which may never answer.
    * Ctrl-C: "interrupted", exit code 130.
    * Anything else is a bug: the traceback is printed as usual (exit code 1).

    ``cleanup`` (e.g. releasing the output folder's lock) runs before the process exits.
    ``EASY_CONTEXT_TRACEBACK=1`` prints the traceback in every case.
    """
    show_traceback = os.environ.get("EASY_CONTEXT_TRACEBACK", "") not in ("", "0")

    def hook(kind, err, tb):
        code = None
        if isinstance(err, KeyboardInterrupt):
            print_error(prog, "interrupted (Ctrl-C)", everywhere=True)
            code = 130
        elif isinstance(err, UserError):
            print_error(prog, str(err), everywhere=err.everywhere)
            code = EXIT_USAGE
        elif (failure := _distributed_failure(err)) is not None:
            limit = f"--dist-timeout {dist_timeout:g} s" if dist_timeout is not None else "the process-group timeout"
            if failure == "timeout":
                what = (f"another process did not answer within {limit}: it stalled, died or fell behind. The run "
                        "stops here; resume it from its latest checkpoint with --resume, and raise --dist-timeout "
                        "if such waits are expected")
            else:
                what = ("lost the connection to another process (it died or was killed). The run stops here; resume "
                        "it from its latest checkpoint with --resume")
            print("", file=sys.__stderr__ or sys.stderr)  # after a progress bar's unfinished line
            print_error(prog, f"{what} ({type(err).__name__}: {str(err).splitlines()[0][:200]})", everywhere=True)
            code = EXIT_DISTRIBUTED
        elif isinstance(err, _USER_ERRORS):
            print_error(prog, f"{err}", everywhere=True)
            code = EXIT_USAGE
        if code is None or show_traceback:
            traceback.print_exception(kind, err, tb, file=sys.__stderr__ or sys.stderr)
        if cleanup is not None:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        for stream in (sys.stdout, sys.stderr, sys.__stderr__):
            if stream is not None:
                stream.flush()
        # Leave at once: a clean shutdown would wait for processes that may never answer.
        os._exit(code if code is not None else 1)

    sys.excepthook = hook
