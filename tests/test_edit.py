"""generate.py --mode edit/augment on the tiny SD model with a LoRA and real Derm7pt images: sources and their
captions, augment's variants and their sources, resume, and bad sources skipped one line each. Every family's
image-to-image pipeline and the kept lesion are tested in test_families.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color

from lesiongen import labels
from lesiongen.captions.analyze import surrounding_ita
from lesiongen.diffusion.edit import Editor, pipeline_inputs, recolour_skin
from lesiongen.diffusion.generate import (
    FLOW_SCHEDULERS,
    SCHEDULERS,
    GenerateConfig,
    build_prompt,
    generate,
    load_model,
    main,
)
from lesiongen.diffusion.sources import source_plan
from lesiongen.errors import InputError


def config(model: Path, data: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(
        model_path=str(model),
        output_dir=str(out),
        mode="edit",
        data_dir=str(data),
        condition="mel",
        guidance_scale=[4.0],
        num_inference_steps=[2],
        strength=0.5,
        resolution=64,
        batch_size=4,
        device="cpu",
        contact_sheet=0,
    )
    return GenerateConfig(**{**base, **kw})


def manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def train_rows(d7p_small_train: Path, label: str) -> list[dict]:
    lines = (d7p_small_train / "metadata.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["label"] == label]


def test_augment_makes_k_variants_naming_their_source_and_a_killed_run_resumes(
    tiny_lora_run, d7p_small_train, tmp_path
):
    cfg = config(tiny_lora_run, d7p_small_train.parent, tmp_path / "aug", mode="augment", variants_per_image=3)

    class Killed(Exception):
        pass

    def kill_after_two(spec, path):
        if len(manifest(tmp_path / "aug")) == 2:
            raise Killed

    with pytest.raises(Killed):
        generate(cfg, on_saved=kill_after_two)
    result = generate(cfg)
    assert (result.planned, result.already_done, result.generated) == (6, 2, 4)
    rows, real = manifest(tmp_path / "aug"), train_rows(d7p_small_train, "mel")
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    expected = {(d7p_small_train / r["file_name"]).as_posix(): r for r in real}
    assert by_source.keys() == expected.keys() and all(len(v) == 3 for v in by_source.values())
    for source, variants in by_source.items():
        assert {r["dx"] for r in variants} == {"mel"} and len({r["seed"] for r in variants}) == 3
        assert {r["site"] for r in variants} == {expected[source]["site"]}  # labels inherited
        assert all(r["strength"] == "0.5" and (tmp_path / "aug" / r["file_name"]).is_file() for r in variants)
    assert len({r["text"] for r in rows}) > len(by_source)  # each variant's phrasing drawn anew
    with pytest.raises(InputError, match="other settings \\(strength: 0.5 -> 0.8\\)"):
        generate(dataclasses.replace(cfg, strength=0.8))
    with pytest.raises(InputError, match="--split validation: augment makes training variants"):
        config(tiny_lora_run, d7p_small_train.parent, tmp_path / "v", mode="augment", split="validation")


def test_an_edit_keeps_the_images_own_caption_unless_a_field_changes(tiny_lora_run, d7p_small_train, tmp_path):
    real = train_rows(d7p_small_train, "mel")
    own = source_plan(config(tiny_lora_run, d7p_small_train.parent, tmp_path / "a"), "text")
    assert [s.text for s in own] == [r["text"] for r in real] and [s.dx for s in own] == ["mel"] * len(real)
    twice = source_plan(config(tiny_lora_run, d7p_small_train.parent, tmp_path / "a", variants_per_image=2), "text")
    assert [s.text for s in twice] == [r["text"] for r in real for _ in range(2)]  # same caption, other seeds
    assert len({s.seed for s in twice}) == len({s.image_id for s in twice}) == 2 * len(real)
    changed = config(tiny_lora_run, d7p_small_train.parent, tmp_path / "b", skin_tone="dark")
    specs = source_plan(changed, "text")
    assert [s.text for s in specs] == [""] * len(real) and {s.skin_tone for s in specs} == {"dark"}
    for spec, row in zip(specs, real, strict=True):
        prompt = build_prompt(spec.record(), "concept", 0)
        assert "dark skin" in prompt and prompt != row["text"]
        assert spec.site == row["site"] and dict(spec.concepts).items() <= {**row, "skin_tone": "dark"}.items()
    generate(changed)
    assert all("dark skin" in r["text"] for r in manifest(tmp_path / "b"))


def test_bad_sources_are_skipped_one_line_each_and_the_rest_are_made(
    tiny_lora_run, d7p_small_train, tmp_path, capsys, monkeypatch
):
    """A plain image folder, labelled by --condition: a good image, one smaller than the model's size, one with
    no lesion to measure, and one whose stored mask covers the whole image. Given relative to the working folder,
    the manifest still names each source so that it opens from any other."""
    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    good, covered = [d7p_small_train / r["file_name"] for r in train_rows(d7p_small_train, "nv")[:2]]
    os.symlink(good.resolve(), folder / "good.jpg")
    os.symlink(covered.resolve(), folder / "covered.jpg")
    with Image.open(covered) as im:
        Image.new("L", im.size, 255).save(masks / "covered.png")
    Image.fromarray(np.full((32, 32, 3), (200, 150, 130), np.uint8)).save(folder / "small.png")
    Image.fromarray(np.full((96, 96, 3), (200, 150, 130), np.uint8)).save(folder / "plain_skin.png")
    args = ["--model_path", str(tiny_lora_run), "--output_dir", str(tmp_path / "out"), "--mode", "edit"]
    monkeypatch.chdir(tmp_path)
    args += ["--data_dir", "images", "--condition", "nv", "--keep", "lesion", "--mask_dir", str(masks)]
    args += ["--num_inference_steps", "2", "--guidance_scale", "4", "--resolution", "64", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr()
    lines = [x for x in printed.err.splitlines() if x.startswith("skipped ")]
    assert len(lines) == 3 and "3 source image(s) skipped" in printed.out
    assert "4 planned (from the images in images)" in printed.out
    assert any("small.png: 32x32 is smaller than the 64 px the model makes" in x for x in lines)
    assert any("plain_skin.png: no lesion mask can be measured (no lesion found)" in x for x in lines)
    assert any("covered.jpg: its lesion mask covers 100% of the image" in x for x in lines)
    (row,) = manifest(tmp_path / "out")
    assert row["source"] == (folder / "good.jpg").as_posix() and row["dx"] == "nv"
    monkeypatch.chdir(masks)
    assert Path(row["source"]).is_file()
    assert float(row["lesion_change"]) == 0.0 and math.isfinite(float(row["skin_ita_after"]))


@pytest.mark.parametrize("strength", ["0", "-0.5", "1.5", "nan"])
def test_a_strength_outside_0_1_is_refused_at_parse_time(tiny_lora_run, d7p_small_train, tmp_path, capsys, strength):
    args = ["--model_path", str(tiny_lora_run), "--output_dir", str(tmp_path), "--mode", "edit"]
    assert main([*args, "--data_dir", str(d7p_small_train.parent), f"--strength={strength}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    said = (
        "--strength nan: is not a finite number" if strength == "nan" else f"--strength: {float(strength)} is outside"
    )
    assert line.startswith(f"error: {said}")
    assert not (tmp_path / "manifest.csv").exists()


def test_edit_flags_without_an_edit_mode_and_a_strength_that_runs_no_step_are_refused(tiny_lora_run, tmp_path):
    with pytest.raises(InputError, match="--keep: applies to --mode edit or augment, not dataset"):
        GenerateConfig(model_path=str(tiny_lora_run), output_dir=str(tmp_path), mode="dataset", keep="lesion")
    with pytest.raises(InputError, match="--strength: 0.1 of 5 steps runs no denoising step"):
        config(tiny_lora_run, tmp_path, tmp_path / "o", strength=0.1, num_inference_steps=[5, 30])
    with pytest.raises(InputError, match="--num_images: plans text-to-image sets, not --mode edit"):
        config(tiny_lora_run, tmp_path, tmp_path / "o", num_images=3)


@pytest.mark.parametrize("scheduler", [n for n in SCHEDULERS if n not in FLOW_SCHEDULERS])
def test_the_kept_cells_are_noised_to_the_level_of_the_step_that_comes_next(
    tiny_lora_run, d7p_small_train, tmp_path, scheduler
):
    """Each sampler's run is the tail of its schedule (PNDM's repeats a timestep): the callback after step i
    must noise the source to the timestep step i+1 denoises, and hold the kept cells to the source at the end."""
    cfg = config(tiny_lora_run, d7p_small_train.parent, tmp_path, keep="lesion", scheduler=scheduler)
    editor = Editor(load_model(cfg, "cpu"), cfg)
    given = editor.prepare(source_plan(cfg, "text")[0].source)
    kwargs = pipeline_inputs(editor.pipe, [given], [0], 0.6)
    keep, seen = kwargs["callback_on_step_end"], []

    def callback(pipe, i, t, tensors):
        schedule, run = pipe.scheduler.timesteps, pipe.num_timesteps
        seen.append((int(t), int(schedule[len(schedule) - run + i])))
        return keep(pipe, i, t, tensors)

    out = editor.pipe(
        ["a lesion"], num_inference_steps=10, output_type="latent", **kwargs | {"callback_on_step_end": callback}
    )
    assert len(seen) == editor.pipe.num_timesteps >= 6 and all(t == indexed for t, indexed in seen)
    inside = keep.mask
    assert torch.equal(out.images[inside], keep.known[inside])


def test_a_skin_tone_edit_starts_from_its_tone_guide_and_keeps_the_source_for_the_lesion(
    tiny_lora_run, d7p_small_train, tmp_path
):
    """--skin_tone with --keep lesion: sampling starts from the source recoloured to the tone's ITA outside the
    kept region (the caption alone moves it a few degrees); the kept pixels, the paste-back and the 'before'
    measures stay the source's. --tone_guide false starts from the source itself."""
    for tone in ("very light", "dark"):
        cfg = config(tiny_lora_run, d7p_small_train.parent, tmp_path, keep="lesion", skin_tone=tone)
        editor = Editor(load_model(cfg, "cpu"), cfg)
        _, (given,) = editor.load(source_plan(cfg, "text")[:1])
        source, start = np.asarray(given.image), np.asarray(given.first)
        assert np.array_equal(source[given.keep], start[given.keep])
        assert surrounding_ita(start, given.keep) == pytest.approx(labels.skin_tone_ita(tone), abs=3)
        if tone == "dark":  # Derm7pt's skin is very light already
            assert surrounding_ita(source, given.keep) > 40
        assert pipeline_inputs(editor.pipe, [given], [0], 0.5)["image"] == [given.first]
    unguided = config(
        tiny_lora_run, d7p_small_train.parent, tmp_path, keep="lesion", skin_tone="dark", tone_guide=False
    )
    _, (given,) = Editor(load_model(unguided, "cpu"), unguided).load(source_plan(unguided, "text")[:1])
    assert given.start is None


def test_variant_skin_tones_draw_each_variants_tone_and_guide_it(tiny_lora_run, d7p_small_train, tmp_path):
    """augment --variant_skin_tones: each variant's tone is drawn from the list by its own seed, named in its
    caption, and its sampling starts from that tone's guide; the draw does not depend on the batch."""
    from lesiongen.captions.analyze import surrounding_ita

    tones = ["very light", "dark"]
    cfg = config(
        tiny_lora_run, d7p_small_train.parent, tmp_path, mode="augment", split="train", keep="lesion",
        variants_per_image=4, variant_skin_tones=tones, condition="all",
    )  # fmt: skip
    plan = source_plan(cfg, "text")
    assert {s.skin_tone for s in plan} == set(tones)
    assert [s.skin_tone for s in plan] == [s.skin_tone for s in source_plan(cfg, "text")]
    editor = Editor(load_model(cfg, "cpu"), cfg)
    specs, inputs = editor.load(plan[:4])
    for spec, given in zip(specs, inputs, strict=True):
        reached = surrounding_ita(np.asarray(given.first), given.keep)
        assert labels.skin_tone_from_ita(reached) == spec.skin_tone
        assert f"{spec.skin_tone} skin" in build_prompt(spec.record(), cfg.caption_style, cfg.seed)
    with pytest.raises(InputError, match="--variant_skin_tones"):
        config(
            tiny_lora_run, d7p_small_train.parent, tmp_path, keep="lesion", skin_tone="dark", variant_skin_tones=tones
        )


def test_the_tone_guide_moves_the_skin_by_one_offset_and_leaves_the_kept_pixels():
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal((200, 150, 125), 6, (64, 64, 3)), 0, 255).astype(np.uint8)
    keep = np.zeros((64, 64), bool)
    keep[24:40, 24:40] = True
    rgb[keep] = (90, 50, 40)
    for tone in labels.SKIN_TONE_NAMES:
        out = recolour_skin(rgb, keep, labels.skin_tone_ita(tone))
        assert np.array_equal(out[keep], rgb[keep])
        assert labels.skin_tone_from_ita(surrounding_ita(out, keep)) == tone
        lightness = [color.rgb2lab(x / 255.0)[~keep][:, 0] for x in (rgb, out)]
        assert np.std(lightness[1]) == pytest.approx(np.std(lightness[0]), rel=0.35)  # the texture is kept
