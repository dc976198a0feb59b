from lesiongen.diffusion.checkpoints import latest_checkpoint, list_checkpoints, prune_checkpoints
from lesiongen.files import atomic_dir


def test_checkpoints_only_exact_names_and_prune(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-5", ".checkpoint-12.tmp", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["checkpoint-2"]
    with atomic_dir(tmp_path / "checkpoint-20") as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert latest_checkpoint(tmp_path).name == "checkpoint-20"
