"""The one exception type front ends turn into a clear one-line message (scripts too:
`run_script`)."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class MistolError(Exception):
    """A problem the user can act on: a bad path, a bad file, a bad option.

    The message is complete on its own (it names the file, what was expected and what was
    found), so the command line prints it as is, without a traceback.
    """


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's main as the command line runs a command: a MistolError is one line on
    stderr and exit status 1, Ctrl-C exit status 130; otherwise main's own status."""
    try:
        status = main()
    except MistolError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    sys.exit(status or 0)
