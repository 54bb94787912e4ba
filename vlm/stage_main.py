"""How a stage script runs and fails: `run_stage(main)` ends every `stages/*.py` (`if __name__ == "__main__"`).

A failed stage prints its own message last, as `stage NAME failed: ...`, and exits with status 1:

- a ValueError or RuntimeError raised by the project's own code (ParamsError, DatasetError, EmbeddingStoreError,
  NonFiniteLossError, ...) is a message written for the user, naming the file, record or param and the fix: it
  is printed alone, without a traceback (set VLM_TRACEBACK=1 to see one);
- anything else is unexpected: its full traceback, then the one-line summary.

The exception is handled here, so nothing it references lives on into interpreter shutdown (an uncaught exception
stays in `sys.last_traceback`; objects its frames hold, such as the git pack files DVCLive's repository opened,
would then be destroyed while Python is half torn down and print their own tracebacks after the stage's).
Output is flushed before exit; SystemExit and KeyboardInterrupt pass through.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

# The project's code: an exception raised from a file below these folders carries a message we wrote.
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("vlm", "stages"))


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; on failure print its message (see the module docstring) and exit with status 1."""
    name = Path(main.__code__.co_filename).stem
    try:
        main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way, then the process ends
        report = failure_report(name, exc, traceback_wanted=os.environ.get("VLM_TRACEBACK", "") not in ("", "0"))
    else:
        return
    sys.stdout.flush()
    sys.stderr.write(report)
    sys.stderr.flush()
    raise SystemExit(1)


def failure_report(stage: str, exc: BaseException, traceback_wanted: bool = False) -> str:
    """What a failed stage prints on stderr: the traceback when the error is unexpected (or asked for), then one
    line `stage NAME failed: ...`."""
    message = str(exc) or type(exc).__name__
    if is_user_error(exc) and not traceback_wanted:
        return f"stage {stage} failed: {message}\n"
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{trace}\nstage {stage} failed: {type(exc).__name__}: {message}\n"


def is_user_error(exc: BaseException) -> bool:
    """A ValueError or RuntimeError raised by the project's own code: its message says what is wrong and what to
    do. The same types from a library (torch, pyarrow, ...) are unexpected and keep their traceback."""
    if not isinstance(exc, (ValueError, RuntimeError)) or exc.__traceback__ is None:
        return False
    frame = exc.__traceback__
    while frame.tb_next is not None:  # the innermost frame: where the exception was raised
        frame = frame.tb_next
    return str(Path(frame.tb_frame.f_code.co_filename).resolve()).startswith(_PROJECT_DIRS)
