"""User errors: a mistake in what the user gave (a flag, a config value, a data file, a path).

`etkd` prints a `UserError` as one line (`etkd <command>: <message>`) and exits with status 2; anything else
is a bug and keeps its traceback. `--debug` shows the traceback of a user error too.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the flag, key or file:line and what was expected.
    (A ValueError, so library callers that catch bad values keep working.)"""

    exit_code = 2


class DataError(UserError):
    """A malformed data file: the message starts with `path:line:` (or `path:` when there is no line).

    `DataError(path, line, message)`; `DataError(message)` takes a message that already names its place.
    """

    def __init__(self, path: object, line: int | None = None, message: str | None = None):
        if message is None:
            self.path, self.line = None, None
            super().__init__(str(path))
            return
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
