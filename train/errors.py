"""Expected faults end a command with one ``error:`` line on stderr and a non-zero exit status.

    @errors.command
    def main(argv: list[str] | None = None) -> int:
      ...

Expected faults are those a user can fix: bad values (``ValueError``), missing, unreadable or unwritable
paths and full disks (``OSError``), an accelerator out of memory, and ``CommandError``, which the trainer's
modules raise for faults they have already described in one line. Anything else is a bug and keeps its
traceback. Setting ``SPARGE_DEBUG=1`` prints the traceback of expected faults too (before the ``error:``
line), and lets orbax's own log lines through (``train.checkpoint``).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable

DEBUG_VARIABLE = "SPARGE_DEBUG"
# An error line longer than this is cut; SPARGE_DEBUG=1 shows the whole message.
MAX_MESSAGE_CHARS = 1500


class CommandError(Exception):
  """A fault the user can fix, whose message already says what is wrong and where (one line)."""


def debug() -> bool:
  """Whether ``SPARGE_DEBUG`` asks for tracebacks and library logs."""
  return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def is_out_of_memory(error: BaseException) -> bool:
  """An XLA allocation failure (``jax.errors.JaxRuntimeError`` with RESOURCE_EXHAUSTED), not a full disk."""
  return (
    type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
    and str(error).startswith("RESOURCE_EXHAUSTED")
    and not is_disk_full(error)
  )


def is_disk_full(error: BaseException) -> bool:
  """ENOSPC or EDQUOT, raised by Python (``OSError``) or reported in the text of a tensorstore error."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(error)
  return "No space left on device" in text or "Disk quota exceeded" in text or "os_error_code='28'" in text


def is_expected(error: BaseException) -> bool:
  return isinstance(error, (CommandError, ValueError, OSError)) or is_out_of_memory(error)


def describe(error: BaseException) -> str:
  """One line for an expected fault: the message, with its whitespace collapsed and its length capped."""
  if isinstance(error, OSError) and error.strerror:
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    text = f"{' -> '.join(names)}: {error.strerror}" if names else error.strerror
  elif is_out_of_memory(error):
    text = f"the accelerator ran out of memory ({str(error).splitlines()[0]})"
  else:
    text = str(error) or type(error).__name__
  text = " ".join(text.split())
  if len(text) > MAX_MESSAGE_CHARS:
    text = f"{text[:MAX_MESSAGE_CHARS]}... ({DEBUG_VARIABLE}=1 shows the whole message)"
  return text


def report(error: BaseException) -> None:
  """Prints ``error: <one line>`` on stderr (and the traceback first under ``SPARGE_DEBUG``)."""
  if debug():
    traceback.print_exception(error, file=sys.stderr)
  print(f"error: {describe(error)}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
  """Prints ``warning: <message>`` on stderr: something was wrong and has been worked around."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def command(main: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps a command's ``main``: expected faults become ``report`` and exit status 1, Ctrl-C exits with 130.

  The wrapped ``main`` must release what it holds (checkpoint managers, locks, files) in ``finally``
  blocks or ``with`` statements, so that every exit path, this one included, leaves no thread running.
  """

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      code = main(*args, **kwargs)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr, flush=True)
      return 130
    except Exception as e:
      if not is_expected(e):
        raise
      report(e)
      return 1
    return 0 if code is None else code

  return wrapped
