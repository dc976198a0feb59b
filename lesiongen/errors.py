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

    def __reduce__(self):
        # Subclasses take other arguments than the message in ``args``, so rebuild from the state: an error
        # raised in a worker process (lesiongen.captions.analyze.measure_files) then reaches the parent whole.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[InputError], args: tuple, state: dict) -> InputError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


def not_utf8(path: str | Path) -> InputError:
    """The error for a text file that is not UTF-8, with the line of its first bad byte and how to convert
    it: spreadsheets often save 'CSV' as Latin-1 or UTF-16, and a binary file passed by mistake shows here too."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return InputError(
            f"{path} line {line}",
            f"is not UTF-8 text (byte 0x{data[e.start]:02x})",
            f"if it is a CSV, save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > fixed.csv) and pass that; "
            "if it is not, pass the CSV instead",
        )
    return InputError(path, "is not UTF-8 text", "save it as UTF-8")
