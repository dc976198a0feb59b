"""Benchmark the image analyzer against expert labels: Derm7pt (train and valid) and PH2.

Prints, per descriptor, the ROC AUC against its expert label; mean and median Dice against the PH2
masks; the claim thresholds calibrated on Derm7pt train with their precision on Derm7pt valid; and
seconds per image. Run from the repo root:

    .venv/bin/python benchmarks/bench_analyze.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import skimage
from PIL import Image
from sklearn.metrics import roc_auc_score

from lesiongen.captions import analyze, reports
from lesiongen.images import read_rgb

REPO = Path(__file__).resolve().parents[1]


def run_d7p(root: Path) -> tuple[pd.DataFrame, list[dict], list[str], tuple[float, float]]:
    meta = pd.read_csv(root / "d7p" / "meta" / "meta.csv")
    split = {}
    for name in ("train", "valid"):
        for i in pd.read_csv(root / "d7p" / "meta" / f"{name}_indexes.csv").iloc[:, 0]:
            split[int(i)] = name
    rows = meta.loc[sorted(split)]
    rows = rows[[(root / "d7p" / "images" / p).is_file() for p in rows["derm"]]]
    start, cpu = time.perf_counter(), time.process_time()
    results = [analyze.analyze_image(read_rgb(root / "d7p" / "images" / p)) for p in rows["derm"]]
    seconds = ((time.perf_counter() - start) / len(rows), (time.process_time() - cpu) / len(rows))
    return rows, results, [split[i] for i in rows.index], seconds


def run_ph2(root: Path) -> tuple[pd.DataFrame, list[dict], np.ndarray, tuple[float, float]]:
    meta = pd.read_csv(root / "ph2" / "meta.csv")
    results, dice = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for image_id in meta["image_id"]:
        r = analyze.analyze_image(read_rgb(root / "ph2" / "images" / f"{image_id}.jpg"))
        results.append(r)
        truth = np.asarray(Image.open(root / "ph2" / "masks" / f"{image_id}.png").convert("L")) >= 128
        dice.append(2 * (r["mask"] & truth).sum() / (r["mask"].sum() + truth.sum()))
    seconds = ((time.perf_counter() - start) / len(meta), (time.process_time() - cpu) / len(meta))
    return meta, results, np.array(dice), seconds


def value(r: dict, key: str) -> float:
    if not r["mask_ok"]:
        return np.nan
    if key.startswith("colors."):
        return r["colors"][key.split(".", 1)[1]]
    return float(r[key])


def auc(y, s) -> float:
    y, s = np.asarray(y, bool), np.asarray(s, float)
    keep = ~np.isnan(s)
    if y[keep].all() or not y[keep].any():
        return float("nan")
    return float(roc_auc_score(y[keep], s[keep]))


# (descriptor, expert label) pairs reported on Derm7pt; near-chance rows are kept on purpose: they are
# why those attributes are never claimed.
D7P_PAIRS = (
    ("blue_gray_pct", "blue_whitish_veil"),
    ("blue_gray_pct", "blue_areas"),
    ("color_variability", "irregular_pigmentation"),
    ("color_asymmetry", "irregular_pigmentation"),
    ("shape_asymmetry", "irregular_pigmentation"),
    ("colors.white", "white_regression"),
    ("red_pct", "vessels"),
)
PH2_PAIRS = tuple((f"colors.{c}", c) for c in analyze.COLOR_NAMES) + (
    ("shape_asymmetry", "asymmetry"),
    ("color_asymmetry", "asymmetry"),
    ("blue_gray_pct", "blue_whitish_veil"),
)


def calibrate(score: np.ndarray, label: np.ndarray, direction: str, target: float, min_n: int = 15) -> float | None:
    """The loosest threshold whose precision reaches ``target`` with at least ``min_n`` images claimed:
    the rule that chose the numbers in reports.CLAIMS on Derm7pt train."""
    keep = ~np.isnan(score)
    score, label = score[keep], label[keep]
    candidates = np.unique(np.round(np.percentile(score, np.arange(2, 99)), 2))
    order = candidates if direction == "above" else candidates[::-1]
    for t in order:
        claimed = score >= t if direction == "above" else score <= t
        if claimed.sum() >= min_n and label[claimed].mean() >= target:
            return float(t)
    return None


def precision(score: np.ndarray, label: np.ndarray, direction: str, t: float) -> tuple[float, int]:
    claimed = (score >= t) if direction == "above" else (score <= t)
    claimed &= ~np.isnan(score)
    return (float(label[claimed].mean()) if claimed.any() else float("nan")), int(claimed.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("LESIONGEN_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    root = Path(args.data)

    rows, d7p, split, d7p_s = run_d7p(root)
    meta, ph2, dice, ph2_s = run_ph2(root)
    split = np.array(split)
    labels = {name: rows.apply(fn, axis=1).to_numpy(bool) for name, fn in reports.EXPERT_TARGETS.items()}
    ph2_labels = {c: (meta[c] == 1).to_numpy() for c in analyze.COLOR_NAMES}
    ph2_labels["asymmetry"] = (meta["asymmetry"] > 0).to_numpy()
    ph2_labels["blue_whitish_veil"] = (meta["blue_whitish_veil"] == "present").to_numpy()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out: dict = {"machine": machine, "numpy": np.__version__, "scikit-image": skimage.__version__}

    print(f"Image analyzer benchmark ({machine}; numpy {np.__version__}, scikit-image {skimage.__version__})\n")
    n_tr, n_va = int((split == "train").sum()), int((split == "valid").sum())
    print(
        f"Derm7pt: {len(rows)} images (train {n_tr}, valid {n_va}), {sum(r['mask_ok'] for r in d7p)} with a usable "
        f"mask; PH2: {len(meta)} images, {sum(r['mask_ok'] for r in ph2)} usable.\n"
    )
    print("| data | descriptor | expert label | ROC AUC train | ROC AUC valid / PH2 |\n|---|---|---|---|---|")
    out["d7p_auc"], out["ph2_auc"] = [], []
    tr, va = split == "train", split == "valid"
    for key, lab in D7P_PAIRS:
        s = np.array([value(r, key) for r in d7p])
        a_tr, a_va = auc(labels[lab][tr], s[tr]), auc(labels[lab][va], s[va])
        out["d7p_auc"].append({"descriptor": key, "label": lab, "train": a_tr, "valid": a_va})
        print(f"| Derm7pt | {key} | {lab} | {a_tr:.3f} | {a_va:.3f} |")
    for key, lab in PH2_PAIRS:
        a = auc(ph2_labels[lab], [value(r, key) for r in ph2])
        out["ph2_auc"].append({"descriptor": key, "label": lab, "auc": a})
        print(f"| PH2 | {key} | {lab} (n={int(ph2_labels[lab].sum())}) | | {a:.3f} |")
    out["ph2_dice"] = {"mean": float(dice.mean()), "median": float(np.median(dice)), "min": float(dice.min())}
    print(f"\nPH2 Dice vs expert masks: mean {dice.mean():.3f}, median {np.median(dice):.3f}, min {dice.min():.3f}\n")

    print("| claim | rule | calibrated on train | used | precision train (n) | precision valid (n) | base rate valid |")
    print("|---|---|---|---|---|---|---|")
    out["claims"] = []
    for claim in reports.CLAIMS:
        s = np.array([value(r, claim.key) for r in d7p])
        y = labels[claim.target]
        chosen = calibrate(s[tr], y[tr], claim.direction, claim.target_precision)
        p_tr, c_tr = precision(s[tr], y[tr], claim.direction, claim.threshold)
        p_va, c_va = precision(s[va], y[va], claim.direction, claim.threshold)
        base = float(y[va][~np.isnan(s[va])].mean())
        op = ">=" if claim.direction == "above" else "<="
        row = {"claim": claim.name, "rule": f"{claim.key} {op} t", "target": claim.target, "calibrated": chosen}
        row.update(threshold=claim.threshold, precision_train=p_tr, n_train=c_tr, precision_valid=p_va, n_valid=c_va)
        out["claims"].append({**row, "base_rate_valid": base})
        print(
            f"| {claim.name} | {claim.key} {op} t; expert: {claim.target} | {chosen} | {claim.threshold} | "
            f"{p_tr:.2f} ({c_tr}) | {p_va:.2f} ({c_va}) | {base:.2f} |"
        )
    tones = pd.Series([r["skin_tone"] for r in d7p + ph2]).value_counts().to_dict()
    out["skin_tone"] = tones
    out["seconds_per_image"] = {"d7p": d7p_s, "ph2": ph2_s}
    print(f"\nSkin tone by ITA over Derm7pt + PH2: {tones}")
    print(
        f"Seconds per image, decode included, wall / CPU: Derm7pt {d7p_s[0]:.3f} / {d7p_s[1]:.3f} (384x256), "
        f"PH2 {ph2_s[0]:.3f} / {ph2_s[1]:.3f} (765x572)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
