import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lesiongen.cli import os_error_line
from lesiongen.errors import InputError
from lesiongen.files import (
    LOCK_NAME,
    append_jsonl,
    atomic_dir,
    atomic_path,
    check_output_apart,
    output_lock,
    read_jsonl,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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


HOLD = """
import sys, time
from lesiongen.files import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def build_captions_into(out: Path, ham_csv: Path) -> subprocess.CompletedProcess:
    """build_captions.py as a user runs it, on 30 HAM10000 rows (metadata only: about a second)."""
    csv = out.parent / "ham.csv"
    if not csv.is_file():
        csv.write_text("".join(ham_csv.read_text().splitlines(keepends=True)[:31]))
    argv = [sys.executable, "build_captions.py", "--dataset", "ham10000", "--metadata", str(csv), "--out", str(out)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300)


def test_a_second_run_into_a_held_folder_stops_naming_the_holder(tmp_path, ham_csv):
    holder = hold_lock(tmp_path / "out")
    try:
        second = build_captions_into(tmp_path / "out", ham_csv)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: --output_dir {tmp_path / 'out'}: another run is writing here (pid {holder.pid} on "
        f"{socket.gethostname()}); wait for it to finish, or choose another folder"
    ]
    assert not (tmp_path / "out" / "captions.jsonl").exists()


def test_a_lock_left_by_a_killed_run_is_named_and_taken_over(tmp_path, ham_csv):
    holder = hold_lock(tmp_path / "out")
    holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the lock file stays behind
    holder.wait()
    assert (tmp_path / "out" / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")
    done = build_captions_into(tmp_path / "out", ham_csv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"taking over the lock left by pid {holder.pid} on {socket.gethostname()}" in done.stdout
    assert (tmp_path / "out" / "captions.jsonl").is_file() and not (tmp_path / "out" / LOCK_NAME).exists()


def test_the_lock_is_released_on_exit_and_a_failed_run_leaves_no_folder(tmp_path):
    with output_lock(tmp_path / "a"):
        assert (tmp_path / "a" / LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(InputError, match="another run is writing here"):
            with output_lock(tmp_path / "a"):  # a second open file description: flock refuses it too
                pass
        (tmp_path / "a" / "result.json").write_text("{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["result.json"]
    with output_lock(tmp_path / "a"):  # released: free again
        pass
    with pytest.raises(RuntimeError), output_lock(tmp_path / "b"):
        raise RuntimeError("bad input found before anything was written")
    assert not (tmp_path / "b").exists()


def test_a_lock_survives_its_folder_being_replaced_whole(tmp_path):
    with output_lock(tmp_path / "vae"):
        with atomic_dir(tmp_path / "vae") as tmp:
            (tmp / "config.json").write_text("{}")
        (tmp_path / "vae" / LOCK_NAME).write_text("not mine")  # a later run's lock in the new folder
    assert (tmp_path / "vae" / LOCK_NAME).read_text() == "not mine"  # left alone


def test_only_the_main_process_of_a_distributed_launch_takes_the_lock(tmp_path, monkeypatch):
    holder = hold_lock(tmp_path / "out")
    try:
        monkeypatch.setenv("RANK", "1")
        with output_lock(tmp_path / "out"):  # rank 1 writes under rank 0's lock
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(InputError, match=f"pid {holder.pid}"), output_lock(tmp_path / "out"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_file_system_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / "nfs"):
        (tmp_path / "nfs" / "result.json").write_text("{}")
    assert "its file system cannot lock files (No locks available)" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "nfs").iterdir()] == ["result.json"]


@pytest.mark.parametrize(
    "output, relation",
    [("images", "is"), ("images/captions", "lies inside"), (".", "contains"), ("link/captions", "lies inside")],
)
def test_an_output_folder_may_not_be_contain_or_lie_inside_an_input(tmp_path, monkeypatch, output, relation):
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"--output_dir {output}: {relation} --images images, which this run reads"):
        check_output_apart(output, {"--images": "images", "--model": "org/hub-model-id"})
    check_output_apart("captions", {"--images": "images", "--metadata": "images/../meta.csv"})
    with pytest.raises(InputError, match="contains --metadata"):
        (tmp_path / "meta.csv").write_text("image_id\n")
        check_output_apart(".", {"--metadata": "meta.csv"})


def test_a_full_disk_under_torch_save_or_safetensors_names_the_file(tmp_path, monkeypatch):
    """Measured on a full tmpfs: torch.save raises RuntimeError('... unexpected pos 704 vs 598') and safetensors
    its own error, neither an OSError; either becomes ENOSPC naming the file, with nothing left behind."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError) as err:
        with atomic_dir(tmp_path / "checkpoint-5") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "checkpoint-5")
    assert list(tmp_path.iterdir()) == []
    assert os_error_line(err.value) == (
        f"{tmp_path / 'checkpoint-5'}: no space left on device (0.0 MB free); "
        "free some disk space, or choose an output folder on another disk"
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**8, 9 * 10**8))
    with pytest.raises(RuntimeError, match="a bug"), atomic_path(tmp_path / "x.pt"):
        raise RuntimeError("a bug")  # with room on the disk, any other failure keeps its own traceback
