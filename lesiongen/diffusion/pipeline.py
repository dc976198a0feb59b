"""Load diffusion models of any family (hub id or directory), tell a LoRA dir from a full pipeline, attach/save LoRA.

Training and generation both load models here, so a directory written by ``train.py`` (either mode)
is read back the same way a user's ``from_pretrained`` call reads it. A LoRA folder records where its
base model was and the base's fingerprint (``fingerprint.py``); a LoRA is applied only to a base with
that fingerprint.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..devices import resolve_device, torch_dtype
from ..errors import InputError
from .families import FAMILIES, Family, detect_family, load_parts
from .fingerprint import fingerprint, model_folder

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# The copy A1111 and ComfyUI load, per family's interchange format (the kohya name is diffusers' scripts').
INTERCHANGE_NAMES = {
    "kohya": "pytorch_lora_weights_kohya.safetensors",
    "comfyui": "pytorch_lora_weights_comfyui.safetensors",
}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str | Path, flag: str = "--pretrained_model_name_or_path") -> str:
    """A local directory, or a hub id; a path-like name that does not exist is an error, not a download.

    ``outputs/lora`` is spelled like a hub id; it is taken for a local path when its first folder exists
    here, or when the hub is off (``HF_HUB_OFFLINE=1``) and no such model is in the cache."""
    text = str(name_or_path)
    if Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not path.is_dir():
            raise InputError(
                f"{flag} {text}", "is a file, not a model directory", "pass the folder holding model_index.json"
            )
        return str(path)
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) or not HUB_ID_RE.match(text)
    looks_local = looks_local or Path(text.split("/")[0]).is_dir()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if looks_local or (offline and model_folder(text) is None):
        raise InputError(
            f"{flag} {text}",
            f"model directory not found (relative paths start in {Path.cwd()})"
            + ("" if looks_local else ", and no hub model of that name is cached (HF_HUB_OFFLINE is set)"),
            "check the path, or build the embedded model with `python -m lesiongen.diffusion.tiny --output_dir DIR`",
        )
    return text


def model_location(source: str) -> str:
    """Where a resolved model is, independent of the current folder: an absolute path, or the hub id."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def check_components(source: str, flag: str) -> None:
    """Every component folder a local pipeline's model_index.json lists is there (diffusers would report a
    missing ``unet/`` as a missing config.json)."""
    if not Path(source).is_dir():
        return
    index_file = Path(source) / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(index_file, f"is not valid JSON ({e})", "restore the pipeline folder") from None
    listed = [
        n for n, spec in index.items() if isinstance(spec, list) and spec[0] is not None and n != "safety_checker"
    ]
    missing = [n for n in listed if not (Path(source) / n).is_dir()]
    if missing:
        raise InputError(
            f"{flag} {source}",
            f"model_index.json lists {', '.join(f'{m}/' for m in missing)} but the folder lacks it",
            "copy the whole pipeline folder, or save it again with save_pretrained",
        )


def is_lora_dir(path: str | Path) -> bool:
    """True for a folder holding diffusers LoRA weights and no full pipeline (no model_index.json)."""
    path = Path(path)
    return (
        path.is_dir()
        and not (path / "model_index.json").exists()
        and any((path / n).is_file() for n in LORA_WEIGHT_NAMES)
    )


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def base_identity(name_or_path: str) -> dict:
    """Where a base model is and what it is, as a LoRA and its checkpoints record it."""
    source = resolve_model(name_or_path)
    return {"base_model": model_location(source), "base_fingerprint": fingerprint(source)}


def model_identity(model_path: str, base_model: str | None = None) -> dict:
    """What a generation runs on: the model (and a LoRA's base) as absolute paths or hub ids, the fingerprint
    of the pipeline's weights (the base's, for a LoRA) and the LoRA weights' checksum."""
    import hashlib

    source = resolve_model(model_path, "--model_path")
    if not is_lora_dir(source):
        return {"model_path": model_location(source), "base_model": None, "fingerprint": fingerprint(source)}
    base = base_model or lora_base_model(source)
    base = resolve_model(base, "--base_model") if base else None
    weights = next(Path(source) / n for n in LORA_WEIGHT_NAMES if (Path(source) / n).is_file())
    now, trained = fingerprint(base) if base else None, lora_record(source).get("base_fingerprint")
    return {
        "model_path": model_location(source),
        "base_model": model_location(base) if base else None,
        "fingerprint": now,
        "lora_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),  # adapters are small: hash them whole
        # the base the LoRA was trained on, and whether this one differs (loaded with --allow_base_mismatch)
        "trained_base_fingerprint": trained,
        "base_mismatch": bool(now and trained and now != trained),
    }


def lora_record(lora_dir: str | Path) -> dict:
    """What train.py recorded in a LoRA folder's config.json (empty when there is none)."""
    cfg = Path(lora_dir) / "config.json"
    if not cfg.is_file():
        return {}
    try:
        record = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(cfg, f"not valid JSON ({e})", "restore the file or pass the base model explicitly") from None
    return record if isinstance(record, dict) else {}


def lora_base_model(lora_dir: str | Path) -> str | None:
    """The base model a LoRA was trained on: a hub id, or a local folder, which train.py records relative to the
    LoRA folder (earlier versions: absolute), so a LoRA copied together with its base still finds it."""
    recorded = lora_record(lora_dir).get("pretrained_model_name_or_path")
    if recorded and not Path(recorded).is_absolute() and (Path(lora_dir) / recorded).is_dir():
        return os.path.normpath(Path(lora_dir) / recorded)
    return recorded


def check_lora_base(lora_dir: str | Path, base: str, allow_mismatch: bool = False) -> bool:
    """Refuse a base whose fingerprint is not the one the LoRA recorded (say so when it recorded none); with
    ``allow_mismatch``, a base of the LoRA's family passes with one warning line. Returns whether it differs."""
    record = lora_record(lora_dir)
    recorded = record.get("base_fingerprint")
    if recorded is None:
        print(
            f"note: {lora_dir} records no fingerprint of its base (an earlier version trained it); not checked",
            file=sys.stderr,
        )
        return False
    if (now := fingerprint(base)) == recorded:
        return False
    what = f"is not the model {lora_dir} was trained on: its fingerprint is {now}, the LoRA's base {lora_base_model(lora_dir)} had {recorded}"
    if not allow_mismatch:
        raise InputError(
            f"--base_model {base}",
            what,
            "pass that base with --base_model, train the LoRA on this one, or pass --allow_base_mismatch to load it "
            "on another fine-tune of the same family",
        )
    family, trained = detect_family(base, flag="--base_model").name, record.get("model_family")
    if trained and family != trained:
        raise InputError(
            f"--base_model {base}",
            f"is a {family} model and {lora_dir} is a {trained} LoRA; --allow_base_mismatch allows another base of the same family only",
            f"pass a {trained} base",
        )
    print(f"warning: --base_model {base} {what}; loading it anyway (--allow_base_mismatch)", file=sys.stderr)
    return True


def is_gated(error: BaseException) -> bool:
    """Whether a load failed on a gated hub repository: diffusers and transformers re-raise huggingface_hub's
    ``GatedRepoError`` as a plain OSError, so the original is found in the exception's chain."""
    from huggingface_hub.errors import GatedRepoError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_error(error: OSError, flag: str, source: str) -> InputError:
    """One line for a model that would not load: a gated hub model (SD 3.5, FLUX.1-dev) says how to log in."""
    if is_gated(error):
        return InputError(
            f"{flag} {source}",
            "is a gated model on the Hugging Face Hub and this account has no access to it",
            f"accept its terms on https://huggingface.co/{source}, then log in with `hf auth login`"
            " (`huggingface-cli login` in older versions) or set HF_TOKEN",
        )
    where = "" if Path(source).is_dir() else f"neither a folder in {Path.cwd()} nor a downloadable hub model: "
    return InputError(
        f"{flag} {source}",
        f"{where}could not load the model ({error.__class__.__name__}: {str(error).splitlines()[0][:300]})",
        "check the path (relative paths start in the current folder) or the hub id, and that the hub is reachable",
    )


def from_pretrained_pipeline(model: str | Path, dtype: Any = None, flag: str = "--pretrained_model_name_or_path"):
    """The family's stock pipeline ``from_pretrained`` (SD without the safety checker), with errors as InputError."""
    source = resolve_model(model, flag)
    if Path(source).is_dir() and not is_pipeline_dir(source):
        raise InputError(
            f"{flag} {source}",
            "no model_index.json here, so it is not a pipeline directory",
            "pass a diffusers pipeline folder",
        )
    check_components(source, flag)
    try:
        family = detect_family(source, flag=flag)
        return family.pipeline_class().from_pretrained(source, torch_dtype=torch_dtype(dtype), **family.pipeline_extras)
    except OSError as e:
        raise load_error(e, flag, source) from None


def load_pipeline(
    model_path: str | Path,
    base_model: str | Path | None = None,
    device: str | None = None,
    dtype: Any = None,
    allow_base_mismatch: bool = False,
):
    """A ready pipeline from a full pipeline dir or hub id, or from a LoRA dir applied to its base model.

    For a LoRA dir the base is ``base_model`` or, when omitted, the one recorded by train.py; either way
    it must have the fingerprint the LoRA recorded (checked once it is loaded, so a hub base is cached), or with
    ``allow_base_mismatch`` be of the LoRA's family (another fine-tune of its base, as LoRA users do daily).
    """
    if is_lora_dir(model_path):
        base = base_model or lora_base_model(model_path)
        if base is None:
            raise InputError(
                model_path, "is a LoRA folder that does not record its base model", "pass the base model (--base_model)"
            )
        pipe = from_pretrained_pipeline(base, dtype, flag="--base_model")
        check_lora_base(model_path, resolve_model(base, "--base_model"), allow_base_mismatch)
        pipe.load_lora_weights(str(model_path))
    else:
        pipe = from_pretrained_pipeline(model_path, dtype, flag="--model_path")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def load_training_parts(model: str | Path, family: str | None = None) -> dict:
    """The family's tokenizers and text encoders, VAE, denoiser (``parts["unet"]``), the noise scheduler of
    its training objective and the sampling scheduler; ``parts["family"]`` is the ``Family`` (``family``
    names it, else model_index.json does)."""
    source = resolve_model(model)
    if Path(source).is_dir() and not is_pipeline_dir(source):
        hint = (
            "this is a LoRA folder; pass its base model" if is_lora_dir(source) else "pass a diffusers pipeline folder"
        )
        raise InputError(f"--pretrained_model_name_or_path {source}", "no model_index.json here", hint)
    check_components(source, "--pretrained_model_name_or_path")
    try:
        return {
            **load_parts(source, detect_family(source, family)),
            "scheduler": base_scheduler(source),
        }
    except OSError as e:
        raise load_error(e, "--pretrained_model_name_or_path", source) from None


def scheduler_config(source: str) -> dict:
    """The scheduler config saved with a model (hub id or folder), as a plain dict."""
    import diffusers

    return dict(diffusers.DDPMScheduler.load_config(source, subfolder="scheduler"))


def base_scheduler(source: str):
    """The model's own sampling scheduler (class named in its config), kept unchanged in saved pipelines."""
    import diffusers

    config = scheduler_config(source)
    cls = getattr(diffusers, config.get("_class_name", ""), None) or diffusers.PNDMScheduler
    return cls.from_config(config)


def add_lora(unet, rank: int, alpha: float | None = None, seed: int | None = None, family: Family = FAMILIES["sd1"]):
    """Attach a trainable LoRA adapter to the family's attention projections; returns its LoraConfig.

    Gaussian init keeps B = 0, so an untrained adapter changes nothing (TOOLCHAIN.md).
    """
    import torch
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(family.lora_targets),
    )
    if seed is not None:
        torch.manual_seed(seed)
    unet.add_adapter(config)
    return config


def lora_state_dict(unet, family: Family = FAMILIES["sd1"]) -> dict:
    """The adapter weights as the family's diffusers scripts save them (UNets in diffusers' naming,
    transformers in PEFT's)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return convert_state_dict_to_diffusers(state) if family.denoiser == "unet" else state


def interchange_state_dict(layers: dict, lora_config, family: Family) -> dict:
    """The LoRA in the format A1111/ComfyUI read: kohya keys for UNet families (diffusers' converter, with
    the trained alpha), and for SD3/Flux the diffusers keys ComfyUI maps, with alpha / rank folded into
    lora_B, since neither that format nor diffusers' SD3 loader carries an alpha."""
    from .families import kohya_state_dict

    if family.interchange == "kohya":
        return kohya_state_dict({f"unet.{k}": v for k, v in layers.items()}, lora_config.lora_alpha)
    scale = lora_config.lora_alpha / lora_config.r
    return {f"{family.denoiser}.{k}": v * scale if ".lora_B." in k else v for k, v in layers.items()}


def save_lora(unet, lora_config, out_dir: str | Path, family: Family = FAMILIES["sd1"]) -> Path:
    """Save in the diffusers format the family pipeline's ``load_lora_weights(dir)`` reads, and the copy
    A1111 and ComfyUI load (``INTERCHANGE_NAMES``).

    The adapter metadata is saved too: without it a LoRA whose alpha differs from its rank reloads at
    the wrong scale, silently (TOOLCHAIN.md).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(unet, family)
    family.pipeline_class().save_lora_weights(
        str(out_dir),
        **{
            f"{family.denoiser}_lora_layers": layers,
            f"{family.denoiser}_lora_adapter_metadata": lora_config.to_dict(),
        },
        safe_serialization=True,
    )
    interchange = {k: v.contiguous() for k, v in interchange_state_dict(layers, lora_config, family).items()}
    save_file(interchange, str(out_dir / INTERCHANGE_NAMES[family.interchange]), metadata={"format": "pt"})
    return out_dir


def assemble_pipeline(parts: dict, unet, text_encoders: dict):
    """The family's pipeline around weights in training (validation, full save); SD without its safety checker.
    ``text_encoders`` replaces the parts' text encoders by name (the ones in training)."""
    family = parts["family"]
    components = {name: parts[name] for name in family.components if name != family.denoiser}
    components |= {family.denoiser: unet, **text_encoders}
    return family.pipeline_class()(**components, **family.pipeline_extras)
