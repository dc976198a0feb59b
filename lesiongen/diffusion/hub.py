"""What a finished run publishes beside its weights: the model card (README.md with the Hub's YAML front matter),
the sample images it shows, and with ``--push_to_hub`` the upload of the output folder to the Hugging Face Hub.

Everything here links inside the output folder with relative paths and names models and data by Hub id or
relative path, so the folder reads the same copied to a cluster or uploaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..files import atomic_path
from .config import TrainConfig, portable_path
from .families import FAMILIES
from .pipeline import INTERCHANGE_NAMES

SAMPLES = "samples"  # the final validation images, one per prompt, that the card shows
CARD_TAGS = ("text-to-image", "diffusers", "dermatology", "medical-imaging", "lesiongen")
# Left out of an upload: resumable checkpoints (optimiser state, several copies of the weights) and hidden
# temporaries and locks; the latent cache is added by ``upload_ignore`` wherever it lives in the folder.
UPLOAD_IGNORE = ("checkpoint-*", ".*", "*/.*")


def write_samples(out: Path, prompts: list[str], images: list) -> list[dict]:
    """The final validation images as ``samples/sample-<i>.png``; returns the card's widget entries (prompt and
    relative link of each)."""
    folder = out / SAMPLES
    shutil.rmtree(folder, ignore_errors=True)  # a previous run's samples in this folder are not this model's
    folder.mkdir(parents=True)
    widget = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        path = folder / f"sample-{i}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        widget.append({"text": prompt, "output": {"url": f"{SAMPLES}/{path.name}"}})
    return widget


def is_local(name: str | None) -> bool:
    return name is not None and Path(name).expanduser().exists()


def front_matter(cfg: TrainConfig, family_name: str, widget: list[dict]) -> str:
    """The card's YAML header: what the Hub indexes (base model, licence, tags, library) and shows (the widget)."""
    from huggingface_hub import ModelCardData

    family = FAMILIES[family_name]
    base = cfg.pretrained_model_name_or_path
    tags = (["lora"] if cfg.mode == "lora" else []) + list(CARD_TAGS) + [f"{family.pipeline}"]
    data = ModelCardData(
        base_model=None if is_local(base) else base,  # the Hub accepts only Hub ids here
        datasets=[cfg.dataset_name] if cfg.dataset_name and not is_local(cfg.dataset_name) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        widget=widget or None,
        **family.hub_license,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(cfg: TrainConfig, record: dict, examples, widget: list[dict], out: Path) -> str:
    """README.md for the output folder: front matter, how to load it, the samples, data, captions and every
    hyperparameter (``record["config"]``, with paths relative to the folder)."""
    family = FAMILIES[record["model_family"]]
    styles = sorted({ex.caption_style or "unknown" for ex in examples})
    extras = ", safety_checker=None" if "safety_checker" in family.pipeline_extras else ""
    folder = Path(out).resolve().name
    here = cfg.hub_model_id if cfg.push_to_hub and cfg.hub_model_id else folder
    where = (
        f"`{here}` is its Hub repository; a local copy of this folder loads the same"
        if here != folder
        else f"`{folder}` is this folder"
    )
    base = portable_path(cfg.pretrained_model_name_or_path, out)
    how = (
        f"pipe = {family.pipeline}.from_pretrained('{base}'{extras})\npipe.load_lora_weights('{here}')"
        if cfg.mode == "lora"
        else f"pipe = {family.pipeline}.from_pretrained('{here}'{extras})"
    )
    interchange = (
        f"`{INTERCHANGE_NAMES[family.interchange]}` holds the same LoRA in the format ComfyUI (and, for the "
        "UNet families, AUTOMATIC1111) load.\n"
        if cfg.mode == "lora"
        else ""
    )
    data = cfg.dataset_name or cfg.train_data_dir
    samples = "\n".join(f"![{w['text']}]({w['output']['url']})" for w in widget)
    gallery = (
        f"\n## Samples\n\nValidation images after the last step, one per prompt:\n\n<Gallery />\n\n{samples}\n"
        if widget
        else ""
    )
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in record["config"].items())
    return f"""{front_matter(cfg, family.name, widget)}
# LesionGen {cfg.mode} model

Fine-tuned ({family.name} family) from `{base}` on {len(examples)} captioned dermoscopic images from
`{portable_path(data, out)}` (caption style: {", ".join(styles)}; trained on the `{record["caption_field"]}`
field), {record["global_step"]} optimiser steps, {record["num_processes"]} process(es), effective batch
{record["effective_batch"]}, final loss {record["final_loss"]}. Written {record["finished"]} by
`lesiongen.diffusion.train`.

Load it with diffusers ({where}):

```python
from diffusers import {family.pipeline}
{how}
image = pipe("melanoma, dermoscopic image").images[0]
```
{interchange}
or, from the folder holding `{folder}`, `python generate.py --model_path {folder} ...`. Synthetic medical images are for research, not diagnosis.
{gallery}
## Hyperparameters

| setting | value |
|---|---|
{rows}
"""


def upload_ignore(cfg: TrainConfig, out: Path) -> list[str]:
    """``UPLOAD_IGNORE`` plus the latent cache when it lives inside the output folder."""
    patterns = list(UPLOAD_IGNORE)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "latent_cache"
    if cache.resolve().is_relative_to(out.resolve()):
        rel = cache.resolve().relative_to(out.resolve()).as_posix()
        patterns += [rel, f"{rel}/*"]
    return patterns


def push_to_hub(cfg: TrainConfig, out: Path) -> str:
    """Create the model repository (``--hub_model_id``, else the output folder's name under the user) if needed and
    upload the folder without checkpoints or caches; returns the repository id. The token is ``--hub_token`` or,
    without it, huggingface_hub's own (HF_TOKEN, or the saved login)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(token=cfg.hub_token)
    repo = cfg.hub_model_id or out.resolve().name
    try:
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            commit_message=f"LesionGen {cfg.mode} model",
            ignore_patterns=upload_ignore(cfg, out),
        )
    except (HfHubHTTPError, LocalTokenNotFoundError, ConnectionError) as e:
        raise InputError(
            f"--push_to_hub {repo}",
            f"the upload failed ({str(e).splitlines()[0]}); the trained model is saved in {out}",
            f"log in (hf auth login, or set HF_TOKEN), then upload it with: hf upload {repo} {out} --exclude "
            "'checkpoint-*' --exclude 'latent_cache/*'",
        ) from None
    print(f"pushed {out} to https://huggingface.co/{repo_id}")
    return repo_id
