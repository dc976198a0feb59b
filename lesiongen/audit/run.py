"""``python -m lesiongen.audit``: does a classifier's answer depend on the skin around the lesion?

Each image of a split is edited to every asked value of one attribute (a skin tone, or any concept the captions
carry) by the generation stage itself (``generate.py --mode edit --keep lesion``: the lesion's pixels are kept,
the rest is re-drawn under the changed caption), so sampling, seeds, the manifest and resume are generation's
own. The classifier then scores each source and each counterfactual, and the flips between them are counted.

An edit counts only when it is valid: the lesion changed by at most ``--max_lesion_change`` (mean absolute
change inside its mask, of 255), the skin around it is skin (its colours scatter no more than real skin's) and,
for skin tone, it measures within one ITA band of the asked tone. Skin-tone edits start from the source with its
skin recoloured to the asked tone (generation's ``--tone_guide``), which the model then redraws. Invalid edits are
excluded and counted, never scored: a model that cannot draw the asked skin says
nothing about the classifier.

Outputs in ``--output_dir``: ``manifest.csv`` (one row per counterfactual), ``audit.json``, ``audit.md``,
``audit.html`` (a grid, each row a lesion and each column a value, and a flip-rate chart) and the images.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..cli import option, run_stage
from ..devices import AUTO, resolve_device
from ..errors import InputError
from ..files import atomic_path, write_json, write_text
from ..images import image_grid, read_rgb
from ..page import Figure, Section, to_html, to_markdown
from ..tables import SPLITS
from .metrics import audit_statistics, interval_words, validity_by_value

GRID_ROWS = 8  # lesions shown in the grid; the statistics use every one
TONE_BANDS = {name: i for i, name in enumerate(labels.SKIN_TONE_NAMES)}  # 0 is the lightest
# How far (degrees of ITA) an edit must move the skin towards the asked tone to count: a third of the narrowest
# band (13 degrees), well above what an edit that keeps the skin moves it (under 2 degrees with random weights).
MIN_ITA_SHIFT = 5.0
# The most an edit's skin ring may scatter in colour (a*b* spread, CIELAB units) and still count as skin: real
# dermoscopy at 64 px measured at most 21.5 (160 Derm7pt and HAM10000 images, their borders), the demo model's
# edits at most 12.8, and a random-weight model's noise at least 35.
MAX_SKIN_SPREAD = 25.0


@dataclass
class AuditConfig:
    """Counterfactual audit of a trained classifier: the same lesions under other values of one attribute."""

    classifier: str = option(help="best.safetensors / last.safetensors written by classifier.py, or its output folder")
    data_dir: str = option(help="build_captions.py output folder whose --split images are audited")
    model: str = option(help="the generator: a LoRA folder (train_lora.sh) or a full pipeline folder (train_SD.sh)")
    values: list[str] = option(help="the attribute's values to edit every image to, e.g. 'very light' dark")
    output_dir: str = option(help="where the counterfactuals, manifest.csv and audit.json/md/html go")
    attribute: str = option("skin_tone", help="skin_tone, or a concept the captions carry (e.g. blue_whitish_veil)")
    split: str = option("test", help="the split of --data_dir to audit", choices=SPLITS)
    base_model: str | None = option(None, help="base pipeline for a LoRA (default: the one its config.json records)")
    counterfactuals_per_image: int = option(1, help="edits of each image per value, each from its own seed")
    strength: float = option(0.6, help="how far each edit moves from its source, in (0, 1] (SDEdit)")
    keep_margin: int = option(2, help="pixels (at the generated size) the kept lesion mask is dilated by")
    guidance_scale: float = option(5.0, help="classifier-free guidance of the edits")
    num_inference_steps: int = option(20, help="denoising steps of a full schedule (an edit runs strength x them)")
    tone_guide: bool = option(
        True, help="skin_tone: start each edit from the skin recoloured to the asked tone (false: the caption only)"
    )
    max_lesion_change: float = option(2.0, help="an edit whose lesion changed more (mean, of 255) is invalid")
    seed: int = option(0, help="seed of the first counterfactual of every image; the k-th uses seed + k")
    resolution: int | None = option(None, help="image size (default: the model's)")
    batch_size: int = option(8, help="images per generation batch")
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda, cuda:1 ...")

    def __post_init__(self) -> None:
        if not self.values:
            raise InputError("--values", "needs at least one value", "e.g. --values 'very light' dark")
        if len(set(self.values)) != len(self.values):
            raise InputError("--values", f"{self.values} repeats a value", "name each value once")
        if self.attribute == "skin_tone":
            unknown = [v for v in self.values if v not in labels.SKIN_TONE_NAMES]
            if unknown:
                raise InputError(
                    "--values", f"{unknown} are not skin tones", f"choose from {', '.join(labels.SKIN_TONE_NAMES)}"
                )
        elif self.attribute not in labels.CONCEPT_NAMES:
            raise InputError(
                "--attribute",
                f"'{self.attribute}' is not skin_tone or a concept the captions carry",
                f"choose skin_tone or one of {', '.join(labels.CONCEPT_NAMES)}",
            )
        if self.counterfactuals_per_image < 1:
            raise InputError("--counterfactuals_per_image", "must be at least 1", "e.g. 2")
        if not 0 <= self.max_lesion_change <= 255:
            raise InputError("--max_lesion_change", f"{self.max_lesion_change} is outside 0-255", "e.g. 2")


def folder_name(value: str, k: int) -> str:
    return f"{value.replace(' ', '-')}-{k}"


def edit_config(cfg: AuditConfig, value: str, k: int, out: Path):
    """Generation's own edit run for one value and one seed: the lesion kept, the caption changed to ``value``."""
    from ..diffusion.generate import GenerateConfig

    change = {"skin_tone": value} if cfg.attribute == "skin_tone" else {"concepts": [f"{cfg.attribute}={value}"]}
    return GenerateConfig(
        mode="edit",
        data_dir=cfg.data_dir,
        split=cfg.split,
        model_path=cfg.model,
        base_model=cfg.base_model,
        output_dir=str(out / "images" / folder_name(value, k)),
        strength=cfg.strength,
        keep="lesion",
        keep_margin=cfg.keep_margin,
        tone_guide=cfg.tone_guide,
        guidance_scale=[cfg.guidance_scale],
        num_inference_steps=[cfg.num_inference_steps],
        seed=cfg.seed + k,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        device=cfg.device,
        contact_sheet=0,
        **change,
    )


def validity(row: pd.Series, cfg: AuditConfig) -> str:
    """Why an edit is not valid ("" when it is). For skin tone the skin must measure within one band of the asked
    tone and, unless the source's skin is already in that band, have moved towards it by ``MIN_ITA_SHIFT``: an
    edit that left the skin as it was is no counterfactual, even where the source's band is next to the asked one."""
    change = pd.to_numeric(row.get("lesion_change"), errors="coerce")
    if not np.isfinite(change) or change > cfg.max_lesion_change:
        return f"lesion changed by {change:.1f} of 255 (limit {cfg.max_lesion_change:g})"
    spread = pd.to_numeric(row.get("skin_spread_after"), errors="coerce")
    if np.isfinite(spread) and spread > MAX_SKIN_SPREAD:
        limit = f"skin under {MAX_SKIN_SPREAD:g}"
        return f"the skin around the lesion is noise, not skin (colour spread {spread:.0f}, {limit})"
    if cfg.attribute != "skin_tone":
        return ""
    before, after = (pd.to_numeric(row.get(k), errors="coerce") for k in ("skin_ita_before", "skin_ita_after"))
    if not (np.isfinite(before) and np.isfinite(after)):
        return "no skin around the lesion to measure"
    asked, source = TONE_BANDS[row["value"]], TONE_BANDS[labels.skin_tone_from_ita(float(before))]
    reached = labels.skin_tone_from_ita(float(after))
    if abs(TONE_BANDS[reached] - asked) > 1:
        return f"skin measured {reached} (ITA {after:.0f}), not near {row['value']}"
    towards = (after - before) * (1 if asked < source else -1)  # a lower band index is lighter: a higher ITA
    if asked != source and towards < MIN_ITA_SHIFT:
        return f"skin moved {after - before:+.1f} degrees of ITA from {before:.0f}, not towards {row['value']}"
    return ""


def counterfactual_rows(cfg: AuditConfig, out: Path) -> pd.DataFrame:
    """Make (or resume) every value's edits and gather their manifests into one table."""
    from ..diffusion.generate import generate
    from ..tables import read_image_table

    frames = []
    for value in cfg.values:
        for k in range(cfg.counterfactuals_per_image):
            gc = edit_config(cfg, value, k, out)
            generate(gc)
            made = read_image_table(gc.output_dir)
            frames.append(made.assign(value=value, k=k, folder=folder_name(value, k)))
    if not frames or not sum(len(f) for f in frames):
        raise InputError(cfg.data_dir, f"no image of its {cfg.split} split could be edited", "see the lines above")
    return pd.concat(frames, ignore_index=True)


def score(cfg: AuditConfig, sources: pd.DataFrame, edits: pd.DataFrame) -> pd.DataFrame:
    """Each counterfactual with the classifier's answer on it and on its source."""
    from ..classify.models import load_classifier, predict_proba

    device = resolve_device(cfg.device)
    model, ccfg, _ = load_classifier(cfg.classifier, device)
    codes = list(labels.CODES)
    base = predict_proba(model, sources, ccfg, device, desc="sources")
    made = predict_proba(model, edits, ccfg, device, desc="counterfactuals")
    by_source = {
        str(Path(p).resolve()): (codes[int(pr.argmax())], pr) for p, pr in zip(sources["path"], base, strict=True)
    }
    rows = []
    for (_, edit), pr in zip(edits.iterrows(), made, strict=True):
        key = str(Path(edit["source"]).resolve())
        if key not in by_source:
            raise InputError(edit["source"], "is an edit source outside the audited split", "rerun into a new folder")
        base_pred, base_pr = by_source[key]
        truth = codes.index(edit["label"])
        rows.append(
            {
                "pred": codes[int(pr.argmax())],
                "p_true": float(pr[truth]),
                "base_pred": base_pred,
                "base_p_true": float(base_pr[truth]),
            }
        )
    return pd.concat([edits.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


MANIFEST_COLUMNS = (
    "file_name", "source", "value", "seed", "label", "valid", "invalid_reason", "lesion_change",
    "skin_ita_before", "skin_ita_after", "skin_spread_after", "pred", "p_true", "base_pred", "base_p_true",
)  # fmt: skip


def manifest(scored: pd.DataFrame, cfg: AuditConfig, out: Path) -> pd.DataFrame:
    reasons = scored.apply(lambda r: validity(r, cfg), axis=1)
    table = scored.assign(
        file_name=[
            Path(p).relative_to(out.resolve()).as_posix() for p in scored["path"].map(lambda p: Path(p).resolve())
        ],
        invalid_reason=reasons,
        valid=reasons == "",
    )
    for column in MANIFEST_COLUMNS:
        if column not in table:
            table[column] = ""
    return table[list(MANIFEST_COLUMNS)]


def grid_figure(table: pd.DataFrame, cfg: AuditConfig, out: Path) -> Path:
    """Rows: lesions with the most valid edits first, one per class in turn, each its source (centre square) then
    its first edit per value; the row label marks each edit valid (+) or excluded (x), since an excluded edit is
    shown too: what the model drew is part of the answer."""
    from PIL import Image

    prefixes = tuple(f"images/{folder_name(v, 0)}/" for v in cfg.values)
    first = table[table["file_name"].str.startswith(prefixes)]
    ranked = first.groupby("source", sort=False).agg(valid=("valid", "sum"), label=("label", "first"))
    ranked["turn"] = ranked.sort_values("valid", ascending=False, kind="stable").groupby("label").cumcount()
    order = ranked.sort_values(["turn", "valid"], ascending=[True, False], kind="stable").index[:GRID_ROWS]
    cells, row_labels = [], []
    for source in order:
        here = first[first["source"] == source]
        cells.append(read_rgb(source, size=min(read_rgb(out / here["file_name"].iloc[0]).shape[:2])))
        marks = []
        for value in cfg.values:
            hit = here[here["value"] == value]
            cells.append(read_rgb(out / hit["file_name"].iloc[0]) if len(hit) else None)
            marks.append("+" if len(hit) and bool(hit["valid"].iloc[0]) else "x")
        row_labels.append(f"{here['label'].iloc[0]} {' '.join(marks)}")
    side = max(c.shape[0] for c in cells if c is not None)
    tiles = [None if c is None else Image.fromarray(c) for c in cells]
    path = out / "audit_grid.png"
    image_grid(tiles, cols=len(cfg.values) + 1, tile=side, row_labels=row_labels).save(path)
    return path


def flip_chart(stats: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("flip_rate", "any flip"), ("flip_benign_to_malignant", "benign to\nmalignant")]
    names.append(("flip_malignant_to_benign", "malignant to\nbenign"))
    shown = [(label, stats[n]) for n, label in names if stats.get(n)]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    if shown:
        est = [s["estimate"] for _, s in shown]
        err = [[e - s["low"] for e, (_, s) in zip(est, shown, strict=True)]]
        err.append([s["high"] - e for e, (_, s) in zip(est, shown, strict=True)])
        ax.bar([label for label, _ in shown], est, yerr=err, capsize=4, color="#4a7ab5")
    ax.set_ylabel("share of valid edits")
    ax.set_ylim(0, 1)
    ax.set_title("Prediction flips (95% interval over lesions)", fontsize=10)
    fig.tight_layout()
    path = out / "audit_flips.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The flip rates, the probability change, the worst value and the equal-opportunity difference, in words."""
    stats = result["statistics"]
    rows = [
        ["flips, any", interval_words(stats.get("flip_rate"))],
        ["flips, benign to malignant", interval_words(stats.get("flip_benign_to_malignant"))],
        ["flips, malignant to benign", interval_words(stats.get("flip_malignant_to_benign"))],
        ["change of the true class's probability", interval_words(stats.get("delta_p_true"))],
        ["worst value's accuracy", interval_words(stats.get("worst_value_accuracy"))],
        ["equal-opportunity difference (TPR, malignant)", interval_words(stats.get("eod"))],
    ]
    return ["measure", "estimate [95% interval]"], rows


def per_value_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Accuracy, true-positive rate and edit validity for each asked value."""
    stats, validity_table = result["statistics"], result["validity"]

    def number(x: float | None, digits: int) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    rows = [
        [
            v,
            interval_words(stats.get(f"accuracy[{v}]")),
            interval_words(stats.get(f"tpr[{v}]")),
            f"{made['valid']} of {made['made']}",
            number(made["lesion_change_mean"], 2),
            number(made["skin_ita_valid_mean"], 1),
        ]
        for v, made in validity_table.items()
    ]
    return ["value", "accuracy", "TPR", "valid edits", "lesion change (of 255)", "skin ITA reached"], rows


def counts_note(result: dict) -> str:
    n, cfg = result["counts"], result["config"]
    return (
        f"{n['sources']} lesions of the {cfg['split']} split, {n['counterfactuals']} counterfactuals "
        f"({cfg['counterfactuals_per_image']} per value), {n['valid']} valid and scored, {n['excluded']} excluded."
    )


def report_sections(result: dict, figures: list[Figure]) -> list[Section]:
    values_note = "Accuracy and true-positive rate (malignant lesions called malignant) on the valid edits."
    grid_note = (
        "Each row one lesion: the source, then its edit to each value in order; the label marks each edit valid (+) "
        "or excluded (x)."
    )
    return [
        Section("Summary", notes=[counts_note(result)], table=summary_table(result), figures=figures[1:]),
        Section("Per value", notes=[values_note], table=per_value_table(result)),
        Section("Counterfactuals", notes=[grid_note], figures=figures[:1]),
    ]


def audit(cfg: AuditConfig) -> dict:
    from ..classify.data import read_real

    out = Path(cfg.output_dir)
    sources = read_real(cfg.data_dir, cfg.split, skip_missing=False)
    edits = counterfactual_rows(cfg, out)
    table = manifest(score(cfg, sources, edits), cfg, out)
    stats = audit_statistics(table, cfg.values, seed=cfg.seed)
    result = {
        "config": asdict(cfg),
        "counts": {
            "sources": int(table["source"].nunique()),
            "counterfactuals": len(table),
            "valid": int(table["valid"].sum()),
            "excluded": int((~table["valid"]).sum()),
            "excluded_reasons": table.loc[~table["valid"], "invalid_reason"].value_counts().to_dict(),
        },
        "statistics": stats,
        "validity": validity_by_value(table, cfg.values),
    }
    with atomic_path(out / "manifest.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out / "audit.json", result)
    figures = [
        Figure("counterfactuals", grid_figure(table, cfg, out), width=110 * (len(cfg.values) + 1)),
        Figure("prediction flips", flip_chart(stats, out)),
    ]
    sections = report_sections(result, figures)
    title = f"Counterfactual audit: {cfg.attribute} ({', '.join(cfg.values)})"
    write_text(out / "audit.md", to_markdown(title, sections, "."))
    write_text(out / "audit.html", to_html(title, sections, f"classifier {Path(cfg.classifier).name}"))
    print_summary(result, cfg, out)
    return result


def print_summary(result: dict, cfg: AuditConfig, out: Path) -> None:
    n, stats = result["counts"], result["statistics"]
    print(f"audited {n['sources']} lesions: {n['valid']} of {n['counterfactuals']} counterfactuals valid")
    print(f"flip rate {interval_words(stats.get('flip_rate'))}; EOD {interval_words(stats.get('eod'))}")
    print(f"wrote {out / 'audit.html'}")


def main(argv: list[str] | None = None) -> int:
    reads = ("classifier", "data_dir", "model", "base_model")
    return run_stage(audit, AuditConfig, argv, "python -m lesiongen.audit", "the audit", reads)


if __name__ == "__main__":
    sys.exit(main())
