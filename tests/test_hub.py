"""What a run publishes: the model card (YAML front matter, samples, no machine paths), the Hub upload (against a
stand-in of the Hub client: no network) and the W&B tracker (absent, and a stand-in module)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from builders import small_config
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from lesiongen.diffusion.hub import front_matter
from lesiongen.diffusion.train import TrainConfig, train
from lesiongen.errors import InputError

SECRET = "hf_not_a_real_token_0123456789"


def run_config(tiny_sd_dir, data_dir, out, **overrides) -> TrainConfig:
    """Two steps, a checkpoint after each, validation images at the end."""
    flags = {"max_train_steps": 2, "checkpointing_steps": 1, "validation_steps": 2, "validation_inference_steps": 2}
    return small_config(tiny_sd_dir, data_dir, out, **{**flags, **overrides})


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """HfApi.create_repo and upload_folder replaced by stand-ins that record their calls."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", self.token, kwargs["repo_id"], kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_card_samples_and_weights_but_no_checkpoints_caches_or_token(
    tiny_sd_dir, d7p_small_train, tmp_path, hub_calls
):
    out = tmp_path / "lesion-lora"
    cfg = run_config(
        tiny_sd_dir, d7p_small_train, out, push_to_hub=True, hub_model_id="me/lesion-lora", report_to="tensorboard"
    )
    train(replace(cfg, hub_token=SECRET))

    (_, token, repo, create_kwargs), (_, upload_token, upload_repo, upload) = hub_calls
    assert (token, repo, create_kwargs["exist_ok"]) == (SECRET, "me/lesion-lora", True)
    assert (upload_token, upload_repo, Path(upload["folder_path"])) == (SECRET, "me/lesion-lora", out)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("checkpoint-1/") for f in files) and any(f.startswith("latent_cache/") for f in files)
    ignored = [*upload["ignore_patterns"], *DEFAULT_IGNORE_PATTERNS]  # what upload_folder itself filters with
    uploaded = set(filter_repo_objects(files, ignore_patterns=ignored))
    assert {"README.md", "config.json", "pytorch_lora_weights.safetensors", "samples/sample-0.png"} <= uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "latent_cache", "."))]
    assert any(f.startswith("logs/") for f in uploaded)  # the loss curve, which the Hub shows

    card = (out / "README.md").read_text()
    header = card_header(card)
    assert header["library_name"] == "diffusers" and header["license"] == "creativeml-openrail-m"
    assert {"lora", "diffusers", "text-to-image", "dermatology"} <= set(header["tags"])
    assert "base_model" not in header  # a local base has no Hub id to name
    prompts = {json.loads(line).get("label") for line in (d7p_small_train / "metadata.jsonl").read_text().splitlines()}
    assert len(header["widget"]) == len(prompts)
    for entry in header["widget"]:
        assert not Path(entry["output"]["url"]).is_absolute() and (out / entry["output"]["url"]).is_file()
        assert f"]({entry['output']['url']})" in card
    assert "pipe.load_lora_weights('me/lesion-lora')" in card
    for text in (card, (out / "config.json").read_text()):
        assert str(tmp_path) not in text and str(tiny_sd_dir.parent) not in text and "/tmp/" not in text
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_the_front_matter_names_a_hub_base_model_dataset_and_the_family_licence():
    cfg = TrainConfig(
        pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium",
        dataset_name="someone/ham10000-captions",
        report_to="none",
    )
    widget = [{"text": "melanoma", "output": {"url": "samples/sample-0.png"}}]
    header = yaml.safe_load(front_matter(cfg, "sd3", widget).split("---\n")[1])
    assert header["base_model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert header["datasets"] == ["someone/ham10000-captions"]
    assert (header["license"], header["license_name"]) == ("other", "stabilityai-ai-community")
    assert header["widget"] == widget and header["pipeline_tag"] == "text-to-image"


def test_a_failed_upload_is_one_line_with_the_command_that_finishes_it(
    tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch
):
    def no_login(self, repo_id, **kwargs):
        raise LocalTokenNotFoundError("Token is required, but no token found")

    monkeypatch.setattr(HfApi, "create_repo", no_login)
    out = tmp_path / "lora"
    cfg = run_config(tiny_sd_dir, d7p_small_train, out, push_to_hub=True, validation_steps=0, max_train_steps=1)
    with pytest.raises(InputError, match=r"--push_to_hub lora: the upload failed .*; log in .* hf upload lora "):
        train(cfg)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()


def test_hub_flags_are_checked_when_the_config_is_built():
    with pytest.raises(InputError, match=r"^--hub_model_id: is used only with --push_to_hub"):
        TrainConfig(hub_model_id="me/x", report_to="none")
    with pytest.raises(InputError, match=r"^--hub_token: would be recorded by wandb"):
        TrainConfig(push_to_hub=True, hub_token=SECRET, report_to="wandb")


def test_report_to_wandb_without_wandb_is_one_line_at_config_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import machinery's mark for a module that is not there
    with pytest.raises(InputError, match=r"^--report_to wandb: wandb is not installed; pip install wandb"):
        TrainConfig(report_to="wandb")


def test_report_to_wandb_logs_config_loss_and_validation_images(tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch):
    """A stand-in wandb module, as accelerate's tracker calls it: init, config.update, run.log, Image."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    runs, configs = [], []

    class Run:
        def __init__(self, project, **kwargs):
            self.project, self.logged = project, []

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda project, **kwargs: runs.append(Run(project, **kwargs)) or runs[-1]
    wandb.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: configs.append(values))
    wandb.Image = lambda image, caption=None: ("image", image.size, caption)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    available = [*accelerate.tracking._available_trackers, LoggerType.WANDB]
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", available)

    train(run_config(tiny_sd_dir, d7p_small_train, tmp_path / "lora", report_to="wandb", checkpointing_steps=100))
    (run,) = runs
    assert run.project == "lesiongen-train" and run.finished
    assert configs[0]["rank"] == 4 and "hub_token" not in configs[0]
    losses = [step for step, values in run.logged if "loss" in values]
    assert losses == [1, 2]
    (images,) = [values["validation"] for step, values in run.logged if "validation" in values and step == 2]
    assert images and all(size == (64, 64) and caption for _, size, caption in images)
