"""``evaluation.md``: the evaluation result as a page a person reads (evaluation.json holds every number)."""

from __future__ import annotations

import numpy as np

from .. import labels


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
    lines += recognisability_lines(result.get("recognisability"))
    lines += steering_lines(result)
    attrs = result.get("attributes", {})
    if attrs:
        lines.append(
            f"## Attributes measured from pixels (lesiongen.analyze)\n\nLesion mask found in {_fmt(attrs['mask_ok'])} of images; median lesion area {_fmt(attrs['median_area_pct'], 1)}% of the image.\n"
        )
        for tone, t in attrs.get("skin_tone", {}).items():
            lines.append(
                f"- asked skin tone '{tone}' (n={t['n']}): measured the same in {_fmt(t['measured_same'])}, "
                f"median ITA {_fmt(t['median_ita'], 1)}, mean distance to the band {_fmt(t['ita_error'], 1)} degrees"
            )
        for name, b in attrs.get("blue_gray", {}).items():
            lines.append(
                f"- blue-whitish veil {name.replace('_', ' ')} (n={b['n']} with a lesion mask): blue-gray found in {_fmt(b['measured_blue_gray'])}"
            )
    lines.append(f"\nStage seconds: {result.get('seconds', {})}\n")
    return "\n".join(lines)


def recognisability_lines(rec: dict | None) -> list[str]:
    if not rec:
        return []
    real = rec["real_balanced_accuracy"]
    lines = [
        "## Recognisability: a classifier trained on real images names the asked condition\n",
        f"Balanced accuracy on {rec['n']} generated images {_fmt(rec['balanced_accuracy'])} (chance {_fmt(rec['chance'])}); "
        f"on {rec['n_heldout_real']} held-out real images {_fmt(real)}; ratio {_fmt(rec['ratio'])} (1.0 = as "
        "recognisable as real). Shmelkov et al.'s GAN-test; its mirror, compare.py's synthetic-only row, is the "
        "Classification Accuracy Score of Ravuri & Vinyals.\n",
        "| condition | recall | predicted as this |",
        "|---|---|---|",
    ]
    ceiling = rec.get("vae_ceiling", {}).get("recall", {})
    if ceiling:
        lines[-2:] = ["| condition | recall | predicted as this | recall of VAE reconstructions |", "|---|---|---|---|"]
    for code, recall in rec["recall"].items():
        extra = f" {_fmt(ceiling.get(code))} |" if ceiling else ""
        lines.append(f"| {labels.BY_CODE[code].name} | {_fmt(recall)} | {rec['predicted'].get(code, 0)} |{extra}")
    lines.append(f"\nConfusion matrix: `{rec['confusion_png']}`; every prediction: `{rec['csv']}`.\n")
    if ceiling:
        c = rec["vae_ceiling"]
        lines.append(
            f"VAE ceiling: the same classifier on the autoencoder's reconstructions of the {c['n']} held-out real "
            f"images, balanced accuracy {_fmt(c['balanced_accuracy'])} (ratio {_fmt(c['ratio'])}); images generated "
            "through this autoencoder cannot do better than its reconstructions (`vae_reconstructions/`).\n"
        )
    return lines


def effect_text(e: dict, digits: int = 3) -> str:
    """'mean [low, high] (n=..)', with ", no effect shown" where the interval as printed includes 0 (so a
    -0.000 [-0.000, -0.000] is never called an effect)."""
    if e.get("mean") is None:
        return e.get("note", "n/a")
    if e.get("low") is None:
        return f"{_fmt(e['mean'], digits)} (n={e['n']})"
    low, high = _fmt(e["low"], digits), _fmt(e["high"], digits)
    printed = [float(x) if x != "n/a" else float("nan") for x in (low, high)]
    words = "" if printed[0] > 0 or printed[1] < 0 else ", no effect shown"
    return f"{_fmt(e['mean'], digits)} [{low}, {high}]{words} (n={e['n']})"


def steering_lines(result: dict) -> list[str]:
    """One row per --contrast switch: the paired probe effect per feature space and the analyzer descriptor's."""
    if "pairs" not in result:
        return []
    spaces = list(result["spaces"])
    heads = [f"probe ({s})" for s in spaces] + ["analyzer descriptor"]
    lines = [
        "## Paired steering: images that share seed and prompt but for one switch\n",
        "Mean paired difference (on minus off) with its bootstrap 95% interval; 'no effect shown' where it includes 0.\n",
        "| switch | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
    ]
    for contrast in result["pairs"]["per_contrast"]:
        cells = [effect_text(result["spaces"][s]["paired_probe"].get(contrast, {})) for s in spaces]
        d = result.get("paired_descriptors", {}).get(contrast)
        cells.append(f"{d['descriptor']} {effect_text(d, 2)}" if d else "n/a")
        lines.append(f"| {contrast} | " + " | ".join(cells) + " |")
    return lines + [""]
