import shutil

import pytest

from lesiongen.captions.rename_metadata import RenameConfig, rename_all
from lesiongen.errors import InputError


def test_renames_the_single_candidate(tmp_path, ham_csv, d7p_csv):
    (tmp_path / "ham10000").mkdir()
    shutil.copy(ham_csv, tmp_path / "ham10000" / "HAM10000_metadata.csv")
    (tmp_path / "d7p" / "meta").mkdir(parents=True)
    shutil.copy(d7p_csv, tmp_path / "d7p" / "meta" / "meta.csv")
    (tmp_path / "d7p" / "meta" / "train_indexes.csv").write_text("indexes\n0\n")
    lines = rename_all(RenameConfig(data_dir=str(tmp_path)))
    assert (tmp_path / "ham10000" / "metadata.csv").is_file()
    assert not (tmp_path / "ham10000" / "HAM10000_metadata.csv").exists()
    assert (tmp_path / "d7p" / "metadata.csv").is_file() and len(lines) == 2
    assert "already in place" in rename_all(RenameConfig(data_dir=str(tmp_path)))[0]


def test_several_candidates_is_an_error_not_a_guess(tmp_path, ham_csv):
    folder = tmp_path / "ham10000"
    folder.mkdir()
    shutil.copy(ham_csv, folder / "a.csv")
    shutil.copy(ham_csv, folder / "b.csv")
    with pytest.raises(InputError, match="several metadata candidates.*a.csv.*b.csv.*--source"):
        rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000"))
    rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000", source=str(folder / "b.csv"), copy=True))
    assert (folder / "metadata.csv").read_bytes() == (folder / "b.csv").read_bytes()


def test_no_candidate_and_dry_run(tmp_path, ham_csv):
    folder = tmp_path / "ham10000"
    folder.mkdir()
    (folder / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="no CSV with the ham10000 columns"):
        rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000"))
    shutil.copy(ham_csv, folder / "HAM10000_metadata.csv")
    rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000", dry_run=True))
    assert not (folder / "metadata.csv").exists()


def test_source_never_overwrites_an_existing_metadata_csv(tmp_path, ham_csv, capsys):
    folder = tmp_path / "ham10000"
    folder.mkdir()
    shutil.copy(ham_csv, folder / "metadata.csv")
    original = (folder / "metadata.csv").read_bytes()
    newer = b"".join(original.splitlines(keepends=True)[:50])
    (folder / "newer.csv").write_bytes(newer)
    lines = rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000", source=str(folder / "newer.csv")))
    assert (folder / "metadata.csv").read_bytes() == newer and not (folder / "newer.csv").exists()
    assert (folder / "metadata.csv.1.bak").read_bytes() == original
    assert "metadata.csv.1.bak" in lines[0] and "metadata.csv.1.bak" in capsys.readouterr().out
    # a second replacement keeps the first backup and numbers the next one
    shutil.copy(ham_csv, folder / "third.csv")
    rename_all(RenameConfig(data_dir=str(tmp_path), dataset="ham10000", source=str(folder / "third.csv")))
    assert (folder / "metadata.csv.1.bak").read_bytes() == original and (folder / "metadata.csv.2.bak").is_file()


def test_a_failure_reports_what_was_already_done(tmp_path, ham_csv, d7p_csv, capsys):
    from lesiongen.captions.rename_metadata import main

    (tmp_path / "ham10000").mkdir()
    shutil.copy(ham_csv, tmp_path / "ham10000" / "HAM10000_metadata.csv")
    (tmp_path / "d7p").mkdir()
    shutil.copy(d7p_csv, tmp_path / "d7p" / "a.csv")
    shutil.copy(d7p_csv, tmp_path / "d7p" / "b.csv")
    assert main(["--data_dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "ham10000: rename" in captured.out and "HAM10000_metadata.csv" in captured.out
    assert captured.err.count("\n") == 1 and "several metadata candidates" in captured.err
    assert (tmp_path / "ham10000" / "metadata.csv").is_file()


def test_a_missing_data_dir_is_an_error_not_a_silent_no_op(tmp_path, capsys):
    from lesiongen.captions.rename_metadata import main

    assert main(["--data_dir", str(tmp_path / "nowhere")]) == 2
    assert f"error: --data_dir {tmp_path / 'nowhere'}: folder not found" in capsys.readouterr().err
