"""Which mixing recipe makes real + synthetic beat real only? Every named recipe on finished experiment seeds.

The paper experiment's captions, VAE, diffusion model, synthetic set and evaluation do not depend on the mixing
recipe, only its real + synthetic classifier (and, for a recipe with a fine-tuning stage, its real-only one, which
then trains as many epochs in all) does. So each recipe reuses a finished run's stages, linked from ``--from``,
and trains only what differs, in ``<out>/<recipe>/seed-N``; ``<out>/recipes.md`` holds one table of them all.

    python experiments/mixing_recipes.py --from outputs/paper --out outputs/recipes --seeds 0 1 2 \\
        --recipes default "bn:synthetic_bn=true" "finetune:finetune_epochs=5" \\
        "text2image:anchored_variants=0" "redrawn:anchored_skin_tones=none,swap_probability=0.5"

A recipe is ``name`` (the experiment's default) or ``name:key=value,...``, the keys being classifier.py's mixing
options or the experiment's ``anchored_variants``, ``anchored_strength``, ``anchored_skin_tones`` (tone names joined
by '+', or 'all': the lesion kept, the skin around it in those tones; 'none': the whole image redrawn) and
``tone_augment`` (every classifier's images recoloured without a model, the yardstick included). Anchored variants
are generated into the ``--from`` folder's seed, so recipes with the same ones share them. Choose a recipe on some
seeds, then run it unchanged on others: a recipe picked on the seeds that score it is not yet a result.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from paper_experiment import PaperConfig, experiment

from lesiongen.classify.compare import differences_markdown, interval_note
from lesiongen.cli import option, run_stage
from lesiongen.errors import InputError
from lesiongen.files import write_json, write_text
from lesiongen.labels import SKIN_TONE_NAMES

# The stages no recipe changes, linked from the finished seed, besides the real-only and synthetic-only classifiers
# where the recipe leaves them as they were (see ``retrained``).
SHARED = ("data", "base-model", "models", "synthetic", "pairs", "evaluation", "anchored")
EXPERIMENT_KEYS = {"anchored_variants": int, "anchored_strength": float, "tone_augment": float}


@dataclass
class RecipesConfig:
    """Run named mixing recipes on finished paper-experiment seeds and tabulate real + synthetic minus real only."""

    source: str = option(help="a finished experiments/paper_experiment.py --out folder", aliases=("--from",))
    output_dir: str = option(help="where each recipe's classifiers and recipes.md go", aliases=("--out",))
    seeds: list[int] = option([0], help="seeds of --from to run each recipe on")
    recipes: list[str] = option(
        ["default"], help="name or name:key=value,... (classifier.py mixing options, anchored_*, tone_augment)"
    )


def parse_recipe(text: str) -> tuple[str, list[str], dict]:
    """(name, classifier mixing pairs, experiment settings) of ``name:key=value,...``."""
    name, _, body = text.partition(":")
    if not name or "/" in name:
        raise InputError("--recipes", f"'{text}' has no usable name", "e.g. bn:synthetic_bn=true")
    pairs, settings = [], {}
    for pair in filter(None, body.split(",")):
        key, _, value = pair.partition("=")
        if key == "anchored_skin_tones":  # tone names joined by '+', 'all', or 'none' (the whole image redrawn)
            settings[key] = {"all": list(SKIN_TONE_NAMES), "none": []}.get(value, value.split("+"))
        elif key in EXPERIMENT_KEYS:
            settings[key] = EXPERIMENT_KEYS[key](value)
        else:
            pairs.append(pair)
    return name, pairs, settings


def retrained(pairs: list[str], settings: dict) -> set[str]:
    """The classifiers besides real + synthetic that a recipe changes: real only when it fine-tunes (real only
    then trains as many epochs in all), real only and synthetic only when every classifier is tone-augmented."""
    runs = {"real"} if any(p.startswith("finetune_epochs=") and not p.endswith("=0") for p in pairs) else set()
    return runs | ({"real", "synthetic"} if settings.get("tone_augment") else set())


def link_shared(source: Path, target: Path, seed: int, retrains: set[str]) -> None:
    """``target`` (a recipe's seed folder) with the finished seed's shared stages linked in: every stage but the
    real + synthetic classifiers and those in ``retrains``."""
    target.mkdir(parents=True, exist_ok=True)
    (source / "anchored").mkdir(exist_ok=True)  # a recipe's variants go to the source, for every recipe to use
    styles = [d.name for d in (source / "classifiers").iterdir() if d.is_dir() and d.name != "real"]
    shared = list(SHARED)
    shared += [] if "synthetic" in retrains else [f"classifiers/{style}/synthetic-seed{seed}" for style in styles]
    shared += [] if "real" in retrains else ["classifiers/real"]
    for name in shared:
        link = target / name
        if (source / name).exists() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((source / name).resolve(), target_is_directory=True)


def run_recipes(cfg: RecipesConfig) -> dict:
    source, out = Path(cfg.source), Path(cfg.output_dir)
    results = source / "results.json"
    if not results.is_file():
        raise InputError(f"--from {source}", "has no results.json", "pass a finished paper_experiment.py --out folder")
    known = {f.name for f in fields(PaperConfig)}
    base = {k: v for k, v in json.loads(results.read_text())["config"].items() if k in known}
    for seed in cfg.seeds:
        if not (source / f"seed-{seed}" / "results.json").is_file():
            raise InputError(f"--seeds {seed}", f"{source}/seed-{seed} is not a finished seed", "run it first")
    table = {}
    for text in cfg.recipes:
        name, pairs, settings = parse_recipe(text)
        recipe_cfg = PaperConfig(
            **{**base, **settings, "output_dir": str(out / name), "seeds": cfg.seeds, "mixing": pairs}
        )
        for seed in cfg.seeds:
            link_shared(source / f"seed-{seed}", out / name / f"seed-{seed}", seed, retrained(pairs, settings))
        table[name] = {"recipe": text, "differences": experiment(recipe_cfg)["differences"]}
    write_json(out / "recipes.json", table)
    write_text(out / "recipes.md", recipes_markdown(table))
    print(recipes_markdown(table))
    return table


def recipes_markdown(table: dict) -> str:
    """Each recipe's real + synthetic minus real only, balanced and worst-group accuracies."""
    rows = [
        {**d, "recipe": name}
        for name, entry in table.items()
        for d in entry["differences"]
        if d["name"].startswith("mixed")
        and d["metric"] in ("balanced_accuracy", "worst_site_group", "worst_sex", "worst_group_accuracy")
    ]
    if not rows:
        return "no recipe ran\n"
    note = interval_note(rows[0]["n_images"], rows[0]["seeds"])
    recipes = "\n".join(f"- {name}: `{entry['recipe']}`" for name, entry in table.items())
    return f"{note}\n\n{recipes}\n\n" + differences_markdown(rows, by=(("recipe", "recipe"), ("name", "classifier")))


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        run_recipes, RecipesConfig, argv, "experiments/mixing_recipes.py", "the mixing recipes", ("source",)
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
