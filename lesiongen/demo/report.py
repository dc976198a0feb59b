"""``report.html`` and ``report.md``: what a run of the pipeline produced, in one page a person can read.

Real vs generated image grids per condition, the diffusion training loss curve (read back from the
training runs' TensorBoard logs), the classifier comparison on held-out real images with worst-group
accuracy, stage times, and the commands that rerun each stage on real HAM10000 / Derm7pt with real
Stable Diffusion weights. The HTML embeds its images, so the one file can be mailed or opened anywhere.

    python -m lesiongen.demo.report --real_data demo_output/captions --synthetic_data demo_output/generated \
        --train_runs base=demo_output/base lora=demo_output/lora --comparison demo_output/classifiers/comparison.json \
        --output_dir demo_output
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import labels
from ..cli import option, parse_config, run
from ..errors import InputError
from ..files import atomic_path, write_text
from ..images import image_grid, open_rgb

GRID_DIR = "report_files"
COMPARISON_COLUMNS = (
    ("name", "classifier trained on"),
    ("n_train", "training images"),
    ("balanced_accuracy", "balanced accuracy"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("worst_group", "worst group"),
    ("worst_group_accuracy", "worst-group accuracy"),
    ("max_gap", "largest gap"),
)

# How each stage runs on real data with real weights; the demo runs the same modules with small flags.
RERUN_COMMANDS: tuple[tuple[str, str], ...] = (
    (
        "Captions (HAM10000)",
        "python build_captions.py --dataset ham10000 --metadata data/ham10000/HAM10000_metadata.csv "
        "--images data/ham10000/images --output_dir data/captions/ham10000",
    ),
    (
        "Captions (Derm7pt, official split)",
        "python build_captions.py --dataset d7p --metadata data/d7p/meta/meta.csv --images data/d7p/images "
        "--output_dir data/captions/d7p --skip_bad_rows",
    ),
    (
        "LoRA on Stable Diffusion 1.5",
        "MODEL_NAME=runwayml/stable-diffusion-v1-5 TRAIN_DATA_DIR=data/captions/ham10000/train "
        "OUTPUT_DIR=outputs/lesiongen-lora ./train_lora.sh",
    ),
    (
        "Full UNet fine-tuning with EMA",
        "MODEL_NAME=runwayml/stable-diffusion-v1-5 TRAIN_DATA_DIR=data/captions/ham10000/train "
        "OUTPUT_DIR=outputs/lesiongen-full ./train_SD.sh",
    ),
    (
        "Balanced synthetic dataset",
        "python generate.py --mode dataset --condition all --num_images 1000 "
        "--model_path outputs/lesiongen-lora --output_dir outputs/generated",
    ),
    (
        "Classifiers: real, synthetic, mixed",
        "for t in real synthetic mixed; do python classification/classifier.py --data_dir data/captions/ham10000 "
        "--train $t --synthetic_dir outputs/generated --output_dir weights/$t; done",
    ),
    (
        "Per-subgroup evaluation on the held-out test split",
        "for t in real synthetic mixed; do python classification/eval.py --checkpoint weights/$t "
        "--data_dir data/captions/ham10000 --split test; done",
    ),
)


@dataclass
class ReportConfig:
    """Write report.html and report.md from a pipeline run's outputs."""

    output_dir: str = option(help="folder for report.html, report.md and report_files/", aliases=("--out",))
    real_data: str = option(help="build_captions.py output folder (real images per condition)")
    synthetic_data: str | None = option(None, help="generate.py output folder (manifest.csv)")
    train_runs: list[str] = option([], help="NAME=DIR of train.py output folders whose loss curves to plot")
    comparison: str | None = option(None, help="comparison.json written by classification/compare.py")
    stage_times: str | None = option(None, help="JSON {stage: seconds}")
    images_per_condition: int = option(8, help="images per row of each grid")
    tile: int = option(64, help="grid tile size in pixels")
    title: str = option("LesionGen report", help="page title")

    def __post_init__(self) -> None:
        for run_spec in self.train_runs:
            if "=" not in run_spec:
                raise InputError("--train_runs", f"'{run_spec}' is not NAME=DIR", "e.g. --train_runs lora=outputs/lora")
        if self.images_per_condition < 1 or self.tile < 8:
            raise InputError("--images_per_condition/--tile", "too small", "use at least 1 image and 8 px tiles")


def condition_grid(real: list[str], generated: list[str], n: int, tile: int):
    """Two rows of ``n`` tiles, real above generated; missing tiles stay grey. Size: (n*tile, 2*tile)."""
    cells = [open_rgb(paths[i]) if i < len(paths) else None for paths in (real, generated) for i in range(n)]
    return image_grid(cells, cols=n, tile=tile)


def pick_paths(frame, code: str, n: int) -> list[str]:
    """The first ``n`` images of a condition in file order (deterministic, so reports are comparable)."""
    if frame is None or frame.empty:
        return []
    rows = frame[frame["label"] == code].sort_values("path")
    return rows["path"].tolist()[:n]


def read_loss_log(train_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a train.py output's TensorBoard logs; empty if it logged nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(train_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars("loss")})
    return sorted(points.items())


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """One panel per run (full training and LoRA differ in scale); a smoothed line over the raw points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.0), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items(), strict=True):
        steps, losses = np.array(points, dtype=float).T
        ax.plot(steps, losses, color="#9ab", lw=0.8, label="per step")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="#135", lw=1.8, label=f"mean of {window}")
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("diffusion loss (MSE)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def comparison_rows(results: dict) -> list[dict]:
    """One table row per classifier run of a ``comparison.json``."""
    runs = [{**r, "n_train": r["n_real"] + r["n_synthetic"]} for r in results.get("runs", [])]
    return [{key: r.get(key) for key, _ in COMPARISON_COLUMNS} for r in runs]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COMPARISON_COLUMNS) + " |"
    sep = "|" + "---|" * len(COMPARISON_COLUMNS)
    body = ["| " + " | ".join(fmt(r[k]) for k, _ in COMPARISON_COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def html_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in COMPARISON_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(r[k]))}</td>" for k, _ in COMPARISON_COLUMNS) + "</tr>" for r in rows
    )
    return f'<table class="cmp"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.note{color:#555;font-size:14px} table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left} th{background:#f3f3f3}
.grid{display:inline-block;margin:6px 14px 10px 0;vertical-align:top} .grid img{image-rendering:pixelated;display:block;border:1px solid #bbb}
.grid .cap{font-size:13px;margin-bottom:2px} pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;word-break:break-all;font-size:12.5px}
"""


def build_report(cfg: ReportConfig) -> dict:
    """Write the grids, the loss PNG, report.md and a self-contained report.html; returns what went in."""
    from ..tables import read_image_table

    out = Path(cfg.output_dir)
    files = out / GRID_DIR
    files.mkdir(parents=True, exist_ok=True)
    real = read_image_table(cfg.real_data)
    synthetic = read_image_table(cfg.synthetic_data) if cfg.synthetic_data else None
    grids = []
    for cond in labels.CONDITIONS:
        r, g = (
            pick_paths(real, cond.code, cfg.images_per_condition),
            pick_paths(synthetic, cond.code, cfg.images_per_condition),
        )
        path = files / f"grid_{cond.code}.png"
        with atomic_path(path) as tmp:
            condition_grid(r, g, cfg.images_per_condition, cfg.tile).save(tmp, format="PNG")
        grids.append({"code": cond.code, "name": cond.name, "path": path, "real": len(r), "generated": len(g)})

    curves = {}
    for spec in cfg.train_runs:
        name, folder = spec.split("=", 1)
        curves[name] = read_loss_log(folder)
    loss_png = files / "loss.png"
    has_loss = plot_losses(curves, loss_png)
    results = json.loads(Path(cfg.comparison).read_text()) if cfg.comparison else {"runs": []}
    rows = comparison_rows(results)
    times = json.loads(Path(cfg.stage_times).read_text()) if cfg.stage_times else {}

    write_text(out / "report.md", render_markdown(cfg, grids, has_loss, curves, results, rows, times))
    write_text(out / "report.html", render_html(cfg, grids, has_loss, loss_png, curves, results, rows, times))
    return {"grids": grids, "loss_points": {k: len(v) for k, v in curves.items()}, "rows": rows, "times": times}


def _loss_text(curves: dict) -> str:
    parts = [
        f"{k}: {len(v)} steps, loss {v[0][1]:.3f} at step {v[0][0]} to {v[-1][1]:.3f} at step {v[-1][0]}"
        for k, v in curves.items()
        if v
    ]
    return "; ".join(parts) or "no training logs found"


def _results_note(results: dict) -> str:
    if not results.get("runs"):
        return ""
    return (
        f"ResNet18 from scratch, evaluated on {results['n_eval']} held-out real images (the {results['split']} split, "
        f"{results['checkpoint']} checkpoint of each run); chance (majority class) balanced accuracy "
        f"{results['baseline']['balanced_accuracy']:.3f}. The worst group is taken over sex, age bin, site group and "
        "skin tone, among groups with at least 3 test images."
    )


def render_markdown(cfg, grids, has_loss, curves, results, rows, times) -> str:
    lines = [f"# {cfg.title}", ""]
    lines += ["## Real (top row) vs generated (bottom row) images per condition", ""]
    for g in grids:
        lines.append(f"**{g['name']}** ({g['code']}; {g['real']} real, {g['generated']} generated)  ")
        lines.append(f"![{g['code']}]({GRID_DIR}/{g['path'].name})")
        lines.append("")
    lines += ["## Diffusion training loss", ""]
    lines += [f"![loss]({GRID_DIR}/loss.png)" if has_loss else "No training logs found.", "", _loss_text(curves), ""]
    lines += ["## Classifiers on held-out real images", "", _results_note(results), ""]
    lines += [markdown_table(rows) if rows else "No classifier results.", ""]
    lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines += ["", "## Rerun each stage on real data with real Stable Diffusion weights", ""]
    for title, command in RERUN_COMMANDS:
        lines += [f"{title}:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def render_html(cfg, grids, has_loss, loss_png, curves, results, rows, times) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(cfg.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(cfg.title)}</h1>",
        "<p class='note'>Every image below is embedded in this file. Top row of each grid: real training images; "
        "bottom row: images generated by the trained model for the same condition.</p>",
        "<h2>Real vs generated images per condition</h2>",
    ]
    for g in grids:
        parts.append(
            f"<div class='grid'><div class='cap'><b>{e(g['name'])}</b> ({e(g['code'])}; {g['real']} real, "
            f"{g['generated']} generated)</div><img alt='{e(g['code'])} grid' src='{data_uri(g['path'])}' "
            f"width='{cfg.images_per_condition * cfg.tile}'></div>"
        )
    parts.append("<h2>Diffusion training loss</h2>")
    parts.append(
        f"<img alt='training loss' src='{data_uri(loss_png)}'>" if has_loss else "<p>No training logs found.</p>"
    )
    parts.append(f"<p class='note'>{e(_loss_text(curves))}</p>")
    parts.append("<h2>Classifiers on held-out real images</h2>")
    parts.append(f"<p class='note'>{e(_results_note(results))}</p>")
    parts.append(html_table(rows) if rows else "<p>No classifier results.</p>")
    parts.append("<h2>Stage times</h2><table><tr><th>stage</th><th>seconds</th></tr>")
    parts += [f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>" for k, v in times.items()]
    parts.append("</table><h2>Rerun each stage on real data with real Stable Diffusion weights</h2>")
    for title, command in RERUN_COMMANDS:
        parts.append(f"<p>{e(title)}:</p><pre>{e(command)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(cfg: ReportConfig) -> dict:
    built = build_report(cfg)
    print(
        f"wrote {Path(cfg.output_dir) / 'report.html'} and report.md: {len(built['grids'])} grids, {len(built['rows'])} classifier rows"
    )
    return built


def main(argv: list[str] | None = None) -> int:
    return run(lambda: report(parse_config(ReportConfig, argv, prog="python -m lesiongen.demo.report")))


if __name__ == "__main__":
    sys.exit(main())
