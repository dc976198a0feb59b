"""Quality-matched sampling speed: the fewest DPM-Solver++ steps whose FID and recognisability match the original's.

The original LesionGen sampled with its model's own scheduler (PNDM for SD-1.x), 50 steps being the
reference here. The same plan (prompts and seeds) is generated with that sampler and with DPM-Solver++ at
each of ``--steps``; both solve the same sampling ODE from the same noise, so image i of one set is the
counterpart of image i of the other. Every set is measured by ``lesiongen.evaluate``: FID against the real
training images in the domain feature space (the real-trained classifier's penultimate layer) and
recognisability (that classifier's balanced accuracy on the generated images). Noise comes from a paired
bootstrap over the plan's images: a step count matches when the 95% interval of its FID minus the
reference's reaches zero or below, and that of its balanced accuracy minus the reference's reaches zero or
above. Run from the repo root, e.g. on the demo's model:

    .venv/bin/python benchmarks/bench_sampler_quality.py --model_path demo_output/model/lora \\
        --real demo_output/captions --classifier demo_output/classifiers/real-seed0 --out /tmp/quality \\
        --images_per_condition 10 --steps 4 6 8 10 15 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from lesiongen.devices import resolve_device
from lesiongen.diffusion.generate import GenerateConfig, Processes, generate, load_model
from lesiongen.evaluate.fidelity import frechet_distance
from lesiongen.evaluate.run import EvaluateConfig, evaluate

RESAMPLES = 500


def measured(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(real features, synthetic features, asked/predicted per synthetic image), rows sorted by file name."""
    features = np.load(folder / "evaluation" / "features_domain.npz")
    table = pd.read_csv(folder / "evaluation" / "recognisability.csv")
    table["key"] = [Path(p).relative_to((folder / "images").resolve()).as_posix() for p in table["path"]]
    order = np.argsort(table["key"].to_numpy())
    return features["real"], features["synthetic"][order], table.iloc[order].reset_index(drop=True)


def paired_bootstrap(ref: Path, other: Path, seed: int = 0) -> dict:
    """95% intervals of FID and balanced-accuracy differences (other minus reference), resampling plan images."""
    real, ref_x, ref_t = measured(ref)
    _, x, t = measured(other)
    assert list(t["key"]) == list(ref_t["key"]), "the two sets must come from one plan"
    rng = np.random.default_rng(seed)
    fid, acc = [], []
    for _ in range(RESAMPLES):
        i = rng.integers(0, len(t), len(t))
        fid.append(frechet_distance(real, x[i]) - frechet_distance(real, ref_x[i]))
        acc.append(
            balanced_accuracy_score(t["asked"][i], t["predicted"][i])
            - balanced_accuracy_score(ref_t["asked"][i], ref_t["predicted"][i])
        )
    (fid_low, fid_high), (acc_low, acc_high) = np.quantile(fid, [0.025, 0.975]), np.quantile(acc, [0.025, 0.975])
    return {
        "fid_difference": [float(fid_low), float(fid_high)],
        "accuracy_difference": [float(acc_low), float(acc_high)],
        "matches": bool(fid_low <= 0 and acc_high >= 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True, help="a trained LoRA or pipeline folder")
    p.add_argument("--real", required=True, help="the build_captions folder the model was trained on")
    p.add_argument("--classifier", required=True, help="a classifier trained on the real images")
    p.add_argument("--out", required=True, help="folder for the generated sets and their evaluations")
    p.add_argument("--images_per_condition", type=int, default=30)
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=3.0,
        help="3: the value the step counts below were matched at (the demo's steering pairs use it)",
    )
    p.add_argument("--reference_scheduler", default="pndm", help="the original sampler (the model's own)")
    p.add_argument("--reference_steps", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20], help="DPM-Solver++ step counts to try")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    out = Path(args.out)
    base = GenerateConfig(
        model_path=args.model_path,
        mode="dataset",
        condition="all",
        num_images=args.images_per_condition,
        guidance_scale=[args.guidance_scale],
        batch_size=args.batch_size,
        device=args.device,
        contact_sheet=0,
    )
    pipe = load_model(base, resolve_device(args.device))
    reference = f"{args.reference_scheduler} {args.reference_steps}"
    runs = {reference: (args.reference_scheduler, args.reference_steps)}
    runs |= {f"dpmsolver++ {n}": ("dpmsolver++", n) for n in args.steps}
    folders = {name: out / name.replace(" ", "-") for name in runs}
    rows = {}
    for name, (scheduler, steps) in runs.items():
        timing = folders[name] / "timing.json"
        if not timing.is_file():  # a rerun keeps finished sets (and generate() resumes a partial one)
            settings = {"scheduler": scheduler, "num_inference_steps": [steps]}
            cfg = GenerateConfig(**{**base.__dict__, **settings, "output_dir": str(folders[name] / "images")})
            start = time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                made = generate(cfg, pipe=pipe, processes=Processes())
            cpu = {"images": made.generated, "cpu_s": time.process_time() - start}
            timing.write_text(json.dumps(cpu))
        with contextlib.redirect_stdout(io.StringIO()):
            result = evaluate(
                EvaluateConfig(
                    real=args.real,
                    synthetic=str(folders[name] / "images" / "manifest.csv"),
                    output_dir=str(folders[name] / "evaluation"),
                    features=["domain"],
                    classifier=args.classifier,
                    device=args.device,
                )
            )
        cpu = json.loads(timing.read_text())
        rows[name] = {
            "fid": result["spaces"]["domain"]["overall"]["fid"],
            "balanced_accuracy": result["recognisability"]["balanced_accuracy"],
            "cpu_s_per_image": cpu["cpu_s"] / cpu["images"],
        }
        if name != reference:
            rows[name] |= paired_bootstrap(folders[reference], folders[name])
        print(name, json.dumps(rows[name]), flush=True)

    print(
        f"\nreal: {args.real} | model: {args.model_path} | torch {torch.__version__} | guidance {args.guidance_scale}"
    )
    print(
        f"{'sampler':<16} {'FID':>7} {'bal.acc':>7} {'CPU-s/img':>9} {'speed':>6}  {'dFID 95%':>16} {'dAcc 95%':>16}  match"
    )
    ref = rows[reference]
    for name, r in rows.items():
        speed = ref["cpu_s_per_image"] / r["cpu_s_per_image"]
        diffs = (
            "{:>16} {:>16}  {}".format(
                *(f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in (r["fid_difference"], r["accuracy_difference"])),
                "yes" if r["matches"] else "no",
            )
            if name != reference
            else f"{'(reference)':>16}"
        )
        print(
            f"{name:<16} {r['fid']:7.2f} {r['balanced_accuracy']:7.3f} {r['cpu_s_per_image']:9.3f} {speed:5.2f}x  {diffs}"
        )
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
