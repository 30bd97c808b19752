"""User errors: a mistake in what the user gave (a flag, a config value, a data file, a path).

`etkd` prints a `UserError` as one line (`etkd <command>: <message>`) and exits with status 2; anything else
is a bug and keeps its traceback. `--debug` shows the traceback of a user error too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the flag, key or file:line and what was expected.
    (A ValueError, so library callers that catch bad values keep working.)"""

    exit_code = 2
