"""Image-to-image sampling for ``generate.py --mode edit/augment``: SDEdit on the family's diffusers pipeline,
and ``--keep lesion``, which keeps the lesion's pixels while the skin around it changes.

SDEdit (Meng et al., ICLR 2022) is what diffusers' image-to-image pipelines do: the source's latents are
noised to the level ``--strength`` picks and denoised from there. Each family's pipeline (``Family.
image_pipeline``) is built from the loaded one with ``from_pipe``, so it shares its weights and any LoRA.

Keeping the lesion is blended latent diffusion (Avrahami et al., SIGGRAPH 2023) with the standard
text-to-image weights: after every step, the latents under the lesion mask (the analyzer's, dilated by
``--keep_margin``) become the source's latents noised to the next step's level, through the pipelines'
``callback_on_step_end``. The VAE cannot return a lesion pixel for pixel, so after decoding the source's
pixels are pasted back under the mask, with an edge feathered outwards into the edited skin.

A caption that names another skin tone moves the measured skin by a few degrees of ITA at most (+2 to +4 on the
demo): SDEdit keeps the source's colours, which is its point. So an edit to ``--skin_tone`` with the lesion kept
starts from a colour guide (``--tone_guide``, as SDEdit's stroke guides): the skin outside the kept region
recoloured to the asked tone's ITA in CIELAB, its texture kept, and the model redraws it from there as skin.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import color, morphology

from .. import labels
from ..captions.analyze import MIN_RING_PIXELS, analyze_image, skin_ring, surrounding_ita
from ..errors import InputError
from ..images import open_rgb

# The paste-back's edge: the source fades into the edit over this share of the image side outside the kept
# region (2 px at 64 px, 16 px at 512 px), so no seam shows where pasted pixels meet generated ones.
FEATHER_FRACTION = 1 / 32
# A kept region over this share of the image leaves too little skin for an edit to show on (the analyzer
# itself stops at a lesion covering 92% of the field of view).
MAX_KEEP_FRACTION = 0.9
# The tone guide's least b* (yellowness): the ITA is atan((L* - 50) / b*), so skin with almost no b* would need an
# extreme L* to reach an asked angle. Measured skin rings have b* of about 10-25.
MIN_GUIDE_B = 12.0


@dataclass
class EditInput:
    """One source as the pipeline takes it."""

    image: Image.Image  # centre square of the source, resized to the generated size
    keep: np.ndarray | None  # --keep lesion: the pixels kept (bool, the generated size)
    start: Image.Image | None = None  # what sampling starts from when not the source: its tone guide

    @property
    def first(self) -> Image.Image:
        return self.start or self.image


def image_pipeline(pipe):
    """The family's image-to-image pipeline on ``pipe``'s components (weights, LoRA, sampler), via ``from_pipe``."""
    import diffusers

    from .families import FAMILIES

    name = type(pipe).__name__
    family = next(f for f in FAMILIES.values() if name in (f.pipeline, f.image_pipeline))
    if name == family.image_pipeline:
        return pipe
    image_pipe = getattr(diffusers, family.image_pipeline).from_pipe(pipe, **family.pipeline_extras)
    image_pipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return image_pipe


def model_resolution(pipe) -> int:
    """The size the pipeline makes when none is asked: its default latent size times the VAE's downscale."""
    cells = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return cells * pipe.vae_scale_factor


def centre_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


class Editor:
    """A run's image-to-image side: the pipeline, the generated size, and the sources that could not be used,
    each named in one line while the rest of the run goes on."""

    def __init__(self, pipe, cfg) -> None:
        self.pipe = image_pipeline(pipe)
        self.cfg = cfg
        self.resolution = cfg.resolution or model_resolution(self.pipe)
        # each spec's skin tone is an asked one (--skin_tone, or a variant's draw from --variant_skin_tones)
        self.guided = bool(cfg.keep and cfg.tone_guide and (cfg.skin_tone or cfg.variant_skin_tones))
        self.skipped = 0

    def load(self, batch: list) -> tuple[list, list[EditInput]]:
        """The batch's usable specs and their inputs; a source that cannot be edited is skipped with its reason."""
        specs, inputs = [], []
        for spec in batch:
            try:
                inputs.append(self.prepare(spec.source, spec.skin_tone if self.guided else None))
            except InputError as e:
                self.skipped += 1
                print(f"skipped {e}", file=sys.stderr)
                continue
            specs.append(spec)
        return specs, inputs

    def prepare(self, source: str, tone: str | None = None) -> EditInput:
        """The source's centre square at the generated size (never upscaled), its kept region with --keep, and with
        ``tone`` the tone guide sampling starts from."""
        image = open_rgb(source)
        if min(image.size) < self.resolution:
            raise InputError(
                source,
                f"{image.width}x{image.height} is smaller than the {self.resolution} px the model makes",
                "use a larger image, or a lower --resolution",
            )
        keep = self.keep_mask(source, image) if self.cfg.keep else None
        square = centre_square(image).resize((self.resolution,) * 2, Image.LANCZOS)
        if tone is None:
            return EditInput(square, keep)
        guide = recolour_skin(np.asarray(square), keep, labels.skin_tone_ita(tone))
        return EditInput(square, keep, Image.fromarray(guide))

    def keep_mask(self, source: str, image: Image.Image) -> np.ndarray:
        """The lesion mask at the generated size, dilated by ``--keep_margin``: ``--mask_dir``'s, else the analyzer's."""
        size = (self.resolution,) * 2
        stored = Path(self.cfg.mask_dir or "") / f"{Path(source).stem}.png"
        if self.cfg.mask_dir and stored.is_file():
            mask = open_rgb(stored).convert("L")
            if mask.size != image.size:
                raise InputError(stored, f"is {mask.width}x{mask.height}, not its image's size", "remake the mask")
            mask = centre_square(mask)
        else:
            found = analyze_image(np.asarray(centre_square(image)))
            if found["problem"]:
                raise InputError(
                    source, f"no lesion mask can be measured ({found['problem']})", "add its mask to --mask_dir"
                )
            mask = Image.fromarray(found["mask"].astype(np.uint8) * 255)
        lesion = np.asarray(mask.resize(size, Image.BILINEAR)) >= 128
        keep = ndi.binary_dilation(lesion, morphology.disk(self.cfg.keep_margin)) if self.cfg.keep_margin else lesion
        share = float(keep.mean())
        if not keep.any() or share > MAX_KEEP_FRACTION:
            raise InputError(
                source,
                f"its lesion mask covers {100 * share:.0f}% of the image (dilated by {self.cfg.keep_margin} px)",
                "lower --keep_margin, or drop --keep for it" if share else "fix its mask in --mask_dir",
            )
        return keep

    def report(self) -> None:
        if self.skipped:
            print(f"{self.skipped} source image(s) skipped (reasons above)")


def pipeline_inputs(pipe, inputs: list[EditInput], seeds: list[int], strength: float) -> dict:
    """The image-to-image arguments of one batch: sources, strength, size where the pipeline takes one (SD3,
    Flux; SD and SDXL keep the image's), and the lesion-keeping callback."""
    width, height = inputs[0].image.size
    out: dict = {"image": [i.first for i in inputs], "strength": strength}
    if "height" in inspect.signature(pipe.__call__).parameters:
        out.update(height=height, width=width)
    if inputs[0].keep is not None:
        out.update(
            callback_on_step_end=KeepLatents(pipe, inputs, seeds), callback_on_step_end_tensor_inputs=["latents"]
        )
    return out


class KeepLatents:
    """``callback_on_step_end``: after step i the latents are at step i+1's noise level, so the kept cells get
    the source's latents noised to that level by the pipeline's own scheduler (DDPM ``add_noise``, rectified
    flow ``scale_noise``), and the source's clean latents after the last step. Flux's packed 2x2 latent
    patches are packed alike."""

    def __init__(self, pipe, inputs: list[EditInput], seeds: list[int]) -> None:
        import torch

        vae = pipe.vae
        pixels = pipe.image_processor.preprocess([i.first for i in inputs]).to(pipe.device)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # as SDXL encodes
        dtype = vae.dtype
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        if upcast:
            vae.to(dtype)
        # each image's latent sample, then its noise, drawn from its seed in the pipelines' order: the kept cells
        # start from the very latents and noise the pipeline starts its image from
        latents, noise = [], []
        for k, seed in enumerate(seeds):
            generator = torch.Generator("cpu").manual_seed(seed)
            draw = torch.randn(dist.mean[k].shape, generator=generator)
            latents.append(dist.mean[k] + dist.std[k] * draw.to(dist.mean))
            noise.append(torch.randn(draw.shape, generator=generator))
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((torch.stack(latents) - shift) * vae.config.scaling_factor).to(dtype)
        b, c, h, w = latents.shape
        scale = pixels.shape[-1] // w
        cells = [i.keep.reshape(h, scale, w, scale).any(axis=(1, 3)) for i in inputs]
        mask = torch.from_numpy(np.stack(cells)[:, None]).to(latents.device).expand(b, c, h, w)
        parts = [latents, mask, torch.stack(noise).to(latents)]
        if hasattr(pipe, "_pack_latents"):  # Flux
            parts = [pipe._pack_latents(p, b, c, h, w) for p in parts]
        self.known, self.mask, self.noise = parts

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        import torch

        latents, scheduler = kwargs["latents"], pipe.scheduler
        run, schedule = pipe.num_timesteps, scheduler.timesteps
        known = self.known
        if i + 1 < run:  # the run is the schedule's last ``run`` steps (the pipelines' get_timesteps)
            level = schedule[len(schedule) - run + i + 1].reshape(1).repeat(len(latents))
            if hasattr(scheduler, "scale_noise"):
                known = scheduler.scale_noise(known, level, self.noise)
            else:
                known = scheduler.add_noise(known, self.noise, level)
        return {"latents": torch.where(self.mask, known.to(latents.dtype), latents)}


def recolour_skin(rgb: np.ndarray, keep: np.ndarray, ita: float) -> np.ndarray:
    """The tone guide: every pixel outside ``keep`` shifted in CIELAB by one L* and one b* offset, so that the skin
    ring's median reads ``ita`` degrees (b* raised to ``MIN_GUIDE_B`` where lower); hair, vessels and shading keep
    their contrast with the skin around them. The kept pixels are untouched."""
    lab = color.rgb2lab(rgb.astype(np.float32) / 255.0)
    ring = skin_ring(keep, np.ones(keep.shape, bool))
    skin = lab[ring] if ring.sum() >= MIN_RING_PIXELS else lab[~keep]
    lightness, b_star = float(np.median(skin[:, 0])), float(np.median(skin[:, 2]))
    target_b = max(b_star, MIN_GUIDE_B)
    target_l = 50.0 + target_b * np.tan(np.radians(ita))
    lab[~keep, 0] = np.clip(lab[~keep, 0] + target_l - lightness, 0.0, 100.0)
    lab[~keep, 2] += target_b - b_star
    with warnings.catch_warnings():  # skimage warns when it clips out-of-gamut colours, as meant here
        warnings.simplefilter("ignore", UserWarning)
        rgb = color.lab2rgb(lab)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def paste_back(images: list, inputs: list[EditInput]) -> tuple[list, list[dict]]:
    """Each kept region's source pixels over the edit, feathered outwards, and what the edit changed: the mean
    absolute change inside the kept region (0-255) and the ITA of the skin ring around it before and after."""
    out, measures = [], []
    for image, given in zip(images, inputs, strict=True):
        if given.keep is None:
            out.append(image)
            measures.append({})
            continue
        source = np.asarray(given.image, np.float32)
        feather = max(1.0, FEATHER_FRACTION * given.keep.shape[0])
        alpha = np.clip(1.0 - ndi.distance_transform_edt(~given.keep) / feather, 0.0, 1.0)[..., None]
        pasted = np.rint(alpha * source + (1.0 - alpha) * np.asarray(image, np.float32)).astype(np.uint8)
        out.append(Image.fromarray(pasted))
        measures.append(edit_measures(np.asarray(given.image), pasted, given.keep))
    return out, measures


def edit_measures(before: np.ndarray, after: np.ndarray, keep: np.ndarray) -> dict:
    """The manifest's measures of one kept-lesion edit."""
    change = np.abs(after.astype(np.float32) - before.astype(np.float32))[keep].mean()
    ita = [surrounding_ita(x, keep) for x in (before, after)]
    return {
        "lesion_change": round(float(change), 3),
        "skin_ita_before": "" if ita[0] is None else round(ita[0], 2),
        "skin_ita_after": "" if ita[1] is None else round(ita[1], 2),
        "skin_spread_after": round(colour_spread(after, skin_ring(keep, np.ones(keep.shape, bool))), 2),
    }


def colour_spread(rgb: np.ndarray, where: np.ndarray) -> float:
    """How far the colours of ``where`` scatter around their mean in the a*b* plane (CIELAB units): skin varies
    little in hue and chroma, noise drawn by a model that cannot draw skin a lot."""
    ab = color.rgb2lab(rgb.astype(np.float32) / 255.0)[where][:, 1:]
    return float(np.sqrt(ab.var(axis=0).sum())) if len(ab) else 0.0
