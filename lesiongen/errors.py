"""The one exception type for bad user input, so every entry point can print it as one line."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input the user can fix: says which file (and row or flag) and how to fix it."""

    def __init__(self, where: str | Path, problem: str, fix: str = "") -> None:
        self.where = str(where)
        self.problem = problem
        self.fix = fix
        message = f"{where}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)
