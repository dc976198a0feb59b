"""What a training run leaves on disk: resumable checkpoints, resume checks, the published result, its card.

A checkpoint is written by every process into one temporary folder renamed ``checkpoint-<step>`` when
complete, so a kill mid-write never leaves a folder resume would load. The final model is moved into
the output folder with the file loaders look for (``model_index.json`` or the LoRA weights) last.
accelerate saves the weights (safetensors), the optimiser and the random states (read back with
``torch.load(weights_only=True)``); the learning-rate schedule and the EMA weights are saved here, as
safetensors and JSON, rather than as accelerate's custom pickles, which it reads with full unpickling.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from ..files import atomic_dir, write_json
from ..states import read_state, write_state
from .config import TrainConfig, recorded_fields
from .fingerprint import fingerprint

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.safetensors"  # the schedule's and the EMA's state, beside accelerate's files

# Fields that shape the weights; a resumed run must not change them silently (STYLE.md).
ARCHITECTURE_FIELDS = (
    "mode",
    "model_family",
    "pretrained_model_name_or_path",
    "resolution",
    "rank",
    "lora_alpha",
    "train_text_encoder",
    "use_ema",
)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; only exact ``checkpoint-<step>`` names count."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond ``keep``; returns what was removed."""
    if not keep or keep <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in removed:
        shutil.rmtree(p)
    return removed


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, checked before any work: it exists and its architecture matches."""
    if cfg.resume_from_checkpoint is None:
        return None
    out = Path(cfg.output_dir)
    flag = f"--resume_from_checkpoint {cfg.resume_from_checkpoint}"
    if cfg.resume_from_checkpoint == "latest":
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise InputError(
                flag,
                f"no complete checkpoint-<step> folder in {out}",
                "omit it to start a new run, or check --output_dir",
            )
    else:
        ckpt = Path(cfg.resume_from_checkpoint)
        ckpt = ckpt if ckpt.exists() else out / ckpt
        if not (ckpt.is_dir() and CHECKPOINT_RE.match(ckpt.name)):
            raise InputError(
                flag, f"{ckpt} is not a checkpoint-<step> folder", "pass 'latest' or an existing checkpoint folder"
            )
    saved_path = ckpt / "config.json"
    if not saved_path.is_file():
        raise InputError(
            ckpt,
            "has no config.json, so it was not written by lesiongen.diffusion.train",
            "resume from another checkpoint",
        )
    if not (ckpt / TRAINING_STATE).is_file():
        raise InputError(
            ckpt,
            f"has no {TRAINING_STATE}: an earlier version wrote it, with the schedule and EMA state as pickles "
            "(custom_checkpoint_*.pkl), which this version does not unpickle",
            "finish the run with the version that started it, or start a new --output_dir",
        )
    record = json.loads(saved_path.read_text(encoding="utf-8"))
    saved, current = record["config"], asdict(cfg)
    check_base(cfg, ckpt, record)
    for name in ARCHITECTURE_FIELDS:
        if saved.get(name) != current[name]:
            raise InputError(
                f"--{name}",
                f"is {current[name]!r} but {ckpt.name} was trained with {saved.get(name)!r}",
                f"pass --{name} {saved.get(name)} or start a new --output_dir",
            )
    return ckpt


def check_base(cfg: TrainConfig, ckpt: Path, record: dict) -> None:
    """The base model is the one the checkpoint trained from: the same path typed from another folder, or
    a folder whose model was replaced, would silently continue on other weights."""
    from .pipeline import resolve_model

    recorded = record.get("base_fingerprint")
    now = fingerprint(resolve_model(cfg.pretrained_model_name_or_path)) if recorded else None
    if now is not None and now != recorded:
        raise InputError(
            f"--pretrained_model_name_or_path {cfg.pretrained_model_name_or_path}",
            f"has fingerprint {now}, but {ckpt.name} was trained from {record.get('base_model')} ({recorded})",
            "pass that model, or start a new --output_dir",
        )


def keep_trainable_weights(models, weights, output_dir) -> None:
    """Checkpoints hold what trains: a LoRA checkpoint is the adapter, not another copy of the frozen base, nor
    its buffers (SD3's position table alone is 226 MB at real size; the config rebuilds it)."""
    for i, model in enumerate(models):
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if i < len(weights) and len(trained) < len(list(model.parameters())):
            weights[i] = {k: v for k, v in weights[i].items() if k in trained}


def save_checkpoint(accelerator, cfg: TrainConfig, step: int, extra: dict, states: dict) -> None:
    """Every process writes into one temporary folder that becomes ``checkpoint-<step>`` only when complete.

    ``states`` maps a name to an object with ``state_dict`` (the lr scheduler, the EMA model) whose state
    goes into ``TRAINING_STATE``; accelerate saves the models, the optimiser and the random states."""
    from accelerate.utils import broadcast_object_list

    out = Path(cfg.output_dir)
    with contextlib.ExitStack() as stack:
        tmp = [
            str(stack.enter_context(atomic_dir(out / f"checkpoint-{step}"))) if accelerator.is_main_process else None
        ]
        if accelerator.num_processes > 1:
            broadcast_object_list(tmp)
        accelerator.save_state(tmp[0])
        if accelerator.is_main_process:
            write_state(Path(tmp[0]) / TRAINING_STATE, {name: obj.state_dict() for name, obj in states.items()})
            write_json(Path(tmp[0]) / "config.json", run_record(cfg, accelerator, step, extra))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prune_checkpoints(out, cfg.checkpoints_total_limit)


def load_checkpoint(accelerator, ckpt: Path, states: dict) -> int:
    """Restore what ``save_checkpoint`` saved into the prepared objects; returns the checkpoint's step."""
    accelerator.load_state(str(ckpt), strict=False)
    saved = read_state(ckpt / TRAINING_STATE, "resume from another checkpoint")
    for name, obj in states.items():
        obj.load_state_dict(saved[name])
    return checkpoint_step(ckpt)


def remove_stale_temporaries(out: Path) -> None:
    """A kill during a checkpoint write leaves ``.checkpoint-N.*.tmp``; resume ignores it, this tidies it."""
    for p in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".result-*"):
        shutil.rmtree(p, ignore_errors=True)


def run_record(cfg: TrainConfig, accelerator, step: int, extra: dict) -> dict:
    return {"config": recorded_fields(cfg), "global_step": step, "num_processes": accelerator.num_processes, **extra}


def publish(out: Path, build: Callable[[Path], None], last: str) -> None:
    """Write the result in a temporary folder, then move it in with ``last`` (the file loaders look for) moved last."""
    tmp = out / f".result-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (out / last).unlink(missing_ok=True)
    build(tmp)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == last):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
