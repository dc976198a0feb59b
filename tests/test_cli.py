"""cli.run: bad input and expected file-system failures are one line and exit 2; real bugs keep their traceback."""

from __future__ import annotations

import errno
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

from lesiongen.cli import run
from lesiongen.errors import InputError


def fails_with(error: BaseException):
    def fn():
        raise error

    return fn


@pytest.mark.parametrize(
    "error, expected",
    [
        (InputError("--flag", "is wrong", "fix it"), "error: --flag: is wrong; fix it"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "error: /data/out: permission denied"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.png"), "error: /data/out/x.png: no space left"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/out"), "error: /data/file/out: not a"),
        (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "error: /data/out: file exists"),
        (OSError(errno.ENOSPC, "No space left on device"), "error: no space left on device"),
    ],
)
def test_expected_failures_are_one_line_naming_the_path(error, expected, capsys):
    assert run(fails_with(error)) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
    if isinstance(error, OSError):
        assert "; " in err  # a fix follows


@pytest.mark.parametrize("bug", [KeyError("column"), TypeError("bad call"), OSError(errno.EIO, "I/O error")])
def test_bugs_and_unexpected_errors_keep_their_traceback(bug):
    with pytest.raises(type(bug)):
        run(fails_with(bug))


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert run(fails_with(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.startswith("interrupted")


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, ham_csv, capsys):
    """Issue 15: --out pointing at a file ended in a FileExistsError / NotADirectoryError traceback."""
    import numpy as np
    from PIL import Image

    from lesiongen.captions import analyze, build

    blocker = tmp_path / "results.txt"
    blocker.write_text("someone's notes")
    small = tmp_path / "small.csv"
    small.write_text("".join(ham_csv.read_text().splitlines(keepends=True)[:30]))
    assert build.main(["--dataset", "ham10000", "--metadata", str(small), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker}") and err.count("\n") == 1 and "choose another path" in err
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(images / "a.png")
    assert analyze.main(["--images", str(images), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker}") and err.count("\n") == 1 and "is a file, not a folder" in err
    assert blocker.read_text() == "someone's notes"


def commands() -> list[str]:
    """Every package module with a ``main(argv)`` entry point (each is a ``python -m`` command)."""
    import lesiongen

    names = [m.name for m in pkgutil.walk_packages(lesiongen.__path__, "lesiongen.") if not m.ispkg]
    return [n for n in names if "def main(argv" in Path(importlib.util.find_spec(n).origin).read_text()]


@pytest.mark.parametrize("module", commands())
def test_every_command_prints_its_help(module, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_non_finite_floats_are_refused_at_parse_time_naming_the_flag(capsys):
    """Issue 32: `--lora_scale nan`, `--guidance_scale inf` and `--learning_rate inf` parsed, and wrote black
    images listed as valid; every float flag of every stage goes through one parser."""
    from dataclasses import dataclass

    from lesiongen.cli import option, parse_config

    @dataclass
    class Settings:
        scale: float = option(1.0)
        scales: list[float] = option([1.0])
        maybe: float | None = option(None)

    for argv, flag in (
        (["--scale", "nan"], "--scale"),
        (["--scales", "3", "inf"], "--scales"),
        (["--maybe=-inf"], "--maybe"),
        (["--maybe", "1e999"], "--maybe"),
        (["--scale=NaN"], "--scale"),
    ):
        assert run(lambda argv=argv: parse_config(Settings, argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} ") and "not a finite number" in err and err.count("\n") == 1, err
    parsed = parse_config(Settings, ["--scale", "2.5", "--scales", "3", "1e-3", "--maybe", "none"])
    assert (parsed.scale, parsed.scales, parsed.maybe) == (2.5, [3.0, 1e-3], None)
    with pytest.raises(SystemExit):  # not a number at all: argparse's own message, as before
        parse_config(Settings, ["--scale", "abc"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_configs_built_in_code_refuse_a_learning_rate_that_is_not_a_positive_number(value, tiny_sd_dir, tmp_path):
    """Issue 32: ``lr <= 0`` let nan through (every comparison with nan is false), which trained to nan weights;
    a config built in code does not pass the CLI's parser, so its own check must catch it."""
    from lesiongen.classify.config import ClassifyConfig
    from lesiongen.diffusion.config import TrainConfig
    from lesiongen.diffusion.train_vae import TrainVAEConfig

    with pytest.raises(InputError, match="--learning_rate: must be a positive number"):
        TrainConfig(pretrained_model_name_or_path=str(tiny_sd_dir), train_data_dir=str(tmp_path), learning_rate=value)
    with pytest.raises(InputError, match="--lr: must be a positive number"):
        ClassifyConfig(data_dir=str(tmp_path), lr=value)
    with pytest.raises(InputError, match="--learning_rate: must be a positive number"):
        TrainVAEConfig(
            pretrained_model_name_or_path=str(tiny_sd_dir), train_data_dir=str(tmp_path), learning_rate=value
        )
    with pytest.raises(InputError, match="--snr_gamma: must be a positive number"):
        TrainConfig(pretrained_model_name_or_path=str(tiny_sd_dir), train_data_dir=str(tmp_path), snr_gamma=value)
