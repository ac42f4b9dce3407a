"""The data stage's one error type: a bad dataset row or file, phrased as one line with file:line."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem the user must fix: the message names the file, the line (or row) and the reason."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
