import errno
import os
from pathlib import Path

import pytest

from lesiongen.files import (
    append_jsonl,
    atomic_dir,
    atomic_path,
    read_jsonl,
    write_json,
)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"i": 1})
    with open(path, "a") as f:
        f.write('{"i": ')
    assert read_jsonl(path) == [{"i": 1}]


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as err:
        write_json(tmp_path / "out.json", {"a": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_atomic_dir_never_replaces_a_file(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(tmp_path / "notes") as tmp:
            (tmp / "x").write_text("y")
    assert (tmp_path / "notes").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes"]
