"""Generation plans: exact subgroup counts, seeded and stable specs, distribution CSVs, clear errors."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pandas as pd
import pytest
from builders import write_metrics

from lesiongen import labels
from lesiongen.classify.metrics import classification_metrics, subgroup_metrics
from lesiongen.diffusion import targets
from lesiongen.diffusion.plans import (
    BALANCE_VALUES,
    MAX_PLAN_IMAGES,
    ORIGINAL_GUIDANCE_SCALES,
    ORIGINAL_STEPS,
    allocate,
    build_plan,
    class_counts,
    class_mix,
    contrast_plan,
    describe_plan,
    image_seed,
    parse_class_weights,
    parse_concepts,
    parse_contrasts,
    read_distribution,
    resolve_codes,
    shard,
    summarize_plan,
)
from lesiongen.errors import InputError


def test_allocate_matches_hand_counts():
    rng = random.Random(0)
    assert allocate(8, [3, 1], rng) == [6, 2]
    assert allocate(7, [0, 1, 1], rng)[0] == 0
    counts = allocate(10, [1, 1, 1], rng)
    assert sum(counts) == 10 and sorted(counts) == [3, 3, 4]
    assert allocate(5, [0.5, 0.25, 0.25], rng) in ([3, 1, 1], [2, 2, 1], [2, 1, 2])
    with pytest.raises(ValueError):
        allocate(3, [0, 0], rng)


def test_resolve_codes_accepts_names_and_codes_in_any_case():
    assert resolve_codes("Melanoma") == ("mel",)
    assert resolve_codes("MEL") == ("mel",)
    assert resolve_codes("melanocytic NEVI") == ("nv",)
    assert resolve_codes("mel, bcc") == ("mel", "bcc")
    assert resolve_codes("all") == labels.CODES
    with pytest.raises(InputError, match=r"--condition: unknown condition 'Melanomma'.*'Melanoma' \(mel\)"):
        resolve_codes("Melanomma")


@pytest.mark.parametrize("n", [12, 100, 7])
def test_balanced_counts_are_exact(n):
    plan = build_plan(("mel", "df"), n, seed=3, balance=["sex", "skin_tone"])
    assert Counter(s.dx for s in plan) == {"mel": n, "df": n}
    cells = len(labels.SKIN_TONE_NAMES) * 2
    for dx in ("mel", "df"):
        per_cell = Counter((s.sex, s.skin_tone) for s in plan if s.dx == dx)
        counts = [per_cell.get((sex, tone), 0) for sex in ("male", "female") for tone in labels.SKIN_TONE_NAMES]
        assert sum(counts) == n
        assert max(counts) - min(counts) <= 1
        assert min(counts) == n // cells


@pytest.mark.parametrize("n", [3, 7, 12, 23, 30, 55])
def test_each_balanced_field_is_even_on_its_own_when_cells_outnumber_images(n):
    plan = build_plan(("bkl",), n, seed=4, balance=["sex", "age_bin", "skin_tone"])
    for field in ("sex", "age_bin", "skin_tone"):
        counts = Counter(getattr(s, field) for s in plan)
        values = [counts.get(v, 0) for v in BALANCE_VALUES[field]]
        assert max(values) - min(values) <= 1, (field, counts)


def test_every_prefix_of_a_balanced_plan_is_spread():
    plan = [s for s in build_plan(("nv",), 60, seed=1, balance=["skin_tone"])]
    for k in (6, 12, 30):
        assert set(Counter(s.skin_tone for s in plan[:k]).values()) == {k // 6}


def test_all_conditions_and_summary():
    plan = build_plan(resolve_codes("all"), 5, seed=0, balance=["age_bin"])
    summary = summarize_plan(plan)
    assert summary["total"] == 5 * len(labels.CONDITIONS)
    assert summary["per_condition"] == {c: 5 for c in labels.CODES}
    assert summary["age_bin"] == {b: len(labels.CODES) for b in labels.AGE_BIN_NAMES}


def test_plan_is_deterministic_and_seeds_do_not_depend_on_plan_size():
    a = build_plan(("mel",), 20, seed=5, balance=["sex"])
    assert a == build_plan(("mel",), 20, seed=5, balance=["sex"])
    assert [s.seed for s in a] != [s.seed for s in build_plan(("mel",), 20, seed=6, balance=["sex"])]
    small = build_plan(("mel",), 8, seed=5)
    assert [s.seed for s in small] == [image_seed(5, "mel", i) for i in range(8)]
    assert [s.seed for s in small] == [s.seed for s in build_plan(("mel",), 30, seed=5)][:8]
    assert len({s.seed for s in build_plan(labels.CODES, 50, seed=0)}) == 50 * len(labels.CODES)
    assert [s.image_id for s in small[:2]] == ["mel_000000", "mel_000001"]


def test_guidance_and_steps_fixed_or_drawn_per_image():
    default = build_plan(("bcc",), 20, seed=0)  # docs/results.md's quality-matched setting, not the original's grid
    assert {(s.guidance_scale, s.num_inference_steps) for s in default} == {(3.0, 10)}
    drawn = build_plan(("bcc",), 200, seed=0, guidance_scales=ORIGINAL_GUIDANCE_SCALES, steps=ORIGINAL_STEPS)
    assert {s.guidance_scale for s in drawn} == set(ORIGINAL_GUIDANCE_SCALES)
    assert {s.num_inference_steps for s in drawn} == set(ORIGINAL_STEPS)
    fixed = build_plan(("bcc",), 20, seed=0, guidance_scales=[7.5], steps=[25])
    assert {(s.guidance_scale, s.num_inference_steps) for s in fixed} == {(7.5, 25)}
    # changing the guidance list does not reshuffle the concepts or the steps
    other = build_plan(("bcc",), 200, seed=0, guidance_scales=[2.0], steps=ORIGINAL_STEPS)
    assert [(s.concepts, s.num_inference_steps) for s in other] == [(s.concepts, s.num_inference_steps) for s in drawn]


def test_fixed_subgroup_values_apply_to_every_image():
    plan = build_plan(("mel",), 10, seed=0, sex="female", age=45, site="back", skin_tone="dark")
    assert {(s.sex, s.age, s.age_bin, s.site, s.site_group, s.skin_tone) for s in plan} == {
        ("female", 45.0, "45-59", "back", "trunk", "dark")
    }
    record = plan[0].record()
    assert (record.sex, record.age, record.site_group, record.skin_tone, record.dx) == (
        "female",
        45.0,
        "trunk",
        "dark",
        "mel",
    )


def test_balanced_age_and_site_draw_values_inside_their_bin_and_group():
    plan = build_plan(("nv",), 50, seed=2, balance=["age", "site"])
    assert Counter(s.age_bin for s in plan) == {b: 10 for b in labels.AGE_BIN_NAMES}
    groups = [g for g in labels.SITE_GROUP_NAMES if g != "unknown"]
    assert Counter(s.site_group for s in plan) == {g: 10 for g in groups}
    assert all(s.age % 5 == 0 and labels.age_bin(s.age) == s.age_bin for s in plan)
    assert all(labels.SITE_GROUPS[s.site] == s.site_group for s in plan)


def test_concept_switches_override_imputation():
    plan = build_plan(("mel",), 30, seed=0, concepts={"blue_whitish_veil": "present"})
    assert all(dict(s.concepts)["blue_whitish_veil"] == "present" for s in plan)
    assert all(len(s.concepts) == len(labels.CONCEPT_NAMES) for s in plan)
    assert {s.concept_source for s in plan} == {"requested+imputed"}
    assert len({s.concepts for s in plan}) > 5  # the other concepts vary per image
    only = build_plan(("mel",), 3, seed=0, concepts={"streaks": "irregular"}, impute=False)
    assert {s.concepts for s in only} == {(("streaks", "irregular"),)} and only[0].concept_source == "requested"
    bare = build_plan(("mel",), 3, seed=0, impute=False)
    assert {(s.concepts, s.concept_source) for s in bare} == {((), "none")}
    # Derm7pt has no actinic keratosis; concepts.py pools its relatives, and every class gets a full profile
    assert {s.concept_source for s in build_plan(labels.CODES, 3, seed=0)} == {"imputed"}


def test_parse_concepts_validates_names_and_values():
    assert parse_concepts(["Streaks=Irregular", "blue_whitish_veil=present"]) == {
        "streaks": "irregular",
        "blue_whitish_veil": "present",
    }
    with pytest.raises(InputError, match="--concepts: 'veil=present' is not name=value"):
        parse_concepts(["veil=present"])
    with pytest.raises(InputError, match="streaks 'wavy' is not valid; choose one of absent, regular, irregular"):
        parse_concepts(["streaks=wavy"])


def test_single_plans_use_consecutive_seeds():
    plan = build_plan(("mel", "nv"), 2, seed=40, single=True)
    assert [(s.dx, s.seed, s.image_id) for s in plan] == [
        ("mel", 40, "mel_seed40"),
        ("mel", 41, "mel_seed41"),
        ("nv", 40, "nv_seed40"),
        ("nv", 41, "nv_seed41"),
    ]


def test_shards_are_disjoint_and_cover_the_plan():
    plan = build_plan(labels.CODES, 9, seed=0)
    parts = [shard(plan, i, 3) for i in range(3)]
    ids = [s.image_id for p in parts for s in p]
    assert sorted(ids) == sorted(s.image_id for s in plan) and len(set(ids)) == len(plan)


def test_distribution_csv_counts_follow_weights(tmp_path):
    csv = tmp_path / "dist.csv"
    pd.DataFrame(
        {
            "dx": ["mel", "mel", "Melanocytic nevi"],
            "sex": ["male", "female", "female"],
            "skin_tone": ["light", "dark", "brown"],
            "weight": [3, 1, 2],
        }
    ).to_csv(csv, index=False)
    plan = build_plan(("mel", "nv"), 8, seed=0, distribution=read_distribution(csv))
    assert Counter((s.dx, s.sex, s.skin_tone) for s in plan) == {
        ("mel", "male", "light"): 6,
        ("mel", "female", "dark"): 2,
        ("nv", "female", "brown"): 8,
    }
    with pytest.raises(InputError, match=r"dist.csv: no rows for Basal cell carcinoma \(bcc\)"):
        build_plan(("bcc",), 3, distribution=read_distribution(csv))
    with pytest.raises(InputError, match="--distribution: sets sex, which is also fixed"):
        build_plan(("mel",), 3, distribution=read_distribution(csv), sex="male")


def test_distribution_from_real_ham10000_metadata_reproduces_its_demographics(ham_csv):
    dist = read_distribution(ham_csv)
    assert set(dist.columns) == {"dx", "sex", "age", "localization"}
    ham = pd.read_csv(ham_csv)
    mel = ham[ham["dx"] == "mel"]
    plan = build_plan(("mel",), len(mel), seed=0, distribution=dist)
    assert Counter(s.sex for s in plan) == Counter(mel["sex"])
    assert Counter(s.site for s in plan) == Counter(mel["localization"])
    bins = Counter(labels.age_bin(a) if a == a else "unknown" for a in mel["age"])
    assert Counter(s.age_bin for s in plan) == bins
    small = build_plan(("mel",), 100, seed=0, distribution=dist)
    male_share = (mel["sex"] == "male").mean()
    assert abs(sum(s.sex == "male" for s in small) - 100 * male_share) <= 2


def test_distribution_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sex,skin_tone\nmale,light\nfemale,purple\n")
    with pytest.raises(InputError, match=r"bad.csv line 3: skin_tone 'purple' is not one of"):
        read_distribution(bad)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("colour,weight\nred,1\n")
    with pytest.raises(InputError, match="no subgroup column"):
        read_distribution(nocol)
    with pytest.raises(InputError, match="distribution CSV not found"):
        read_distribution(tmp_path / "missing.csv")
    for weight in ("inf", "nan", "1e999", "-2"):  # issue 32: float() reads inf and nan, and the draws became nan
        bad.write_text(f"sex,weight\nmale,1\nfemale,{weight}\n")
        with pytest.raises(InputError, match=rf"bad.csv line 3: weight '{weight}' is not a finite number >= 0"):
            read_distribution(bad)


def test_balance_errors():
    with pytest.raises(InputError, match="--balance: cannot balance over 'hair'"):
        build_plan(("mel",), 4, balance=["hair"])
    with pytest.raises(InputError, match="--balance: sex is both balanced and fixed"):
        build_plan(("mel",), 4, balance=["sex"], sex="male")
    with pytest.raises(InputError, match="--num_images: 0 is not positive"):
        build_plan(("mel",), 0)
    with pytest.raises(InputError, match="--skin_tone: 'pale' is not valid"):
        build_plan(("mel",), 4, skin_tone="pale")


def test_parse_contrasts_defaults_and_errors():
    veil, tone, streaks = parse_contrasts(["blue_whitish_veil", "skin_tone", "streaks=irregular:regular"])
    assert (veil.field, veil.on, veil.off, veil.label) == (
        "blue_whitish_veil", "present", "absent", "blue_whitish_veil=present:absent",
    )  # fmt: skip
    assert (tone.on, tone.off) == ("very light", "brown") and (streaks.on, streaks.off) == ("irregular", "regular")
    for bad, match in [
        (["size"], "names no checklist concept"),
        (["streaks=wavy"], "streaks 'wavy' is not valid"),
        (["streaks=absent:absent"], "the same value"),
        (["streaks", "streaks=regular"], "names a field twice"),
    ]:
        with pytest.raises(InputError, match=match):
            parse_contrasts(bad)


def test_contrast_pairs_differ_in_exactly_one_field():
    plan = build_plan(["mel", "nv"], 3, seed=4, balance=["sex"])
    pairs = contrast_plan(plan, parse_contrasts(["blue_whitish_veil", "skin_tone=light:dark"]))
    assert len(pairs) == 2 * 2 * len(plan)
    for spec, group in zip(plan, [pairs[i : i + 4] for i in range(0, len(pairs), 4)], strict=True):
        veil_on, veil_off, light, dark = group
        for member in group:
            assert (member.image_id, member.seed, member.sex, member.guidance_scale) == (
                spec.image_id, spec.seed, spec.sex, spec.guidance_scale,
            )  # fmt: skip
        assert dict(veil_on.concepts)["blue_whitish_veil"] == "present" and veil_on.variant == "present"
        assert dict(veil_off.concepts)["blue_whitish_veil"] == "absent" and veil_off.stem.endswith(
            "_blue_whitish_veil-absent"
        )
        rest = lambda s: {k: v for k, v in s.concepts if k != "blue_whitish_veil"}  # noqa: E731
        assert rest(veil_on) == rest(veil_off) == rest(spec)
        assert (light.skin_tone, dark.skin_tone) == (
            "light",
            "dark",
        ) and light.concepts == dark.concepts == spec.concepts
        assert len({m.stem for m in group}) == 4 and light.contrast == "skin_tone=light:dark"


def test_a_distribution_csv_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_bytes("sex,site_group,weight\nfemale,trunk,1\nmale,tête,2\n".encode("latin-1"))
    with pytest.raises(InputError, match="cells.csv line 3: is not UTF-8 text"):
        read_distribution(path)


def test_every_member_of_several_switches_has_its_own_file():
    """Two concept switches both have an 'absent' side with different prompts: they must not share a file."""
    plan = build_plan(["akiec", "mel"], 2, seed=0)
    switches = ["blue_whitish_veil", "streaks", "dots_and_globules", "vascular_structures", "skin_tone"]
    pairs = contrast_plan(plan, parse_contrasts(switches))
    assert len({s.stem for s in pairs}) == len(pairs) == 2 * len(switches) * len(plan)
    first = [s for s in pairs if s.image_id == plan[0].image_id]
    assert [s.stem for s in first[:2]] == [
        f"{plan[0].image_id}_blue_whitish_veil-present",
        f"{plan[0].image_id}_blue_whitish_veil-absent",
    ]


def test_class_weights_are_codes_or_names_normalised_and_bad_ones_are_one_line():
    weights = parse_class_weights(["nv=0.4,mel=0.15", "Basal cell carcinoma=0.25", "bkl=0.2,"])
    assert weights == pytest.approx({"bcc": 0.25, "bkl": 0.2, "mel": 0.15, "nv": 0.4})
    assert list(weights) == ["bcc", "bkl", "mel", "nv"]  # labels' order, whatever the order given
    assert parse_class_weights(["mel=3", "nv=1"]) == {"mel": 0.75, "nv": 0.25}
    valid = ", ".join(labels.CODES)
    with pytest.raises(InputError, match=f"^--class_weights: 'melanome' is not a dx code; use {valid}$"):
        parse_class_weights(["nv=0.4,melanome=0.15"])
    for bad in ("mel=-1", "mel=nan", "mel=inf", "mel", "mel=lots"):
        with pytest.raises(InputError, match=f"--class_weights: '{bad}' is not code=weight with a weight of 0 or"):
            parse_class_weights([f"nv=1,{bad}"])
    with pytest.raises(InputError, match="--class_weights: names mel twice"):
        parse_class_weights(["mel=1,MEL=2"])
    with pytest.raises(InputError, match="--class_weights: gives no class a positive weight"):
        parse_class_weights(["mel=0"])


def test_class_counts_are_largest_remainder_and_sum_exactly():
    # 7 x (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4: floors 3, 2, 1 and the one image left goes to the largest remainder, nv
    assert class_counts(7, {"nv": 0.5, "mel": 0.3, "bcc": 0.2}, seed=0) == {"bcc": 1, "mel": 2, "nv": 4}
    weights = parse_class_weights(["nv=0.4,mel=0.15,bcc=0.15,bkl=0.1,akiec=0.1,df=0.05,vasc=0.05"])
    for total in (1, 13, 999, 10_000):
        counts = class_counts(total, weights, seed=3)
        assert sum(counts.values()) == total
        assert all(abs(counts.get(c, 0) - total * w) < 1 for c, w in weights.items())
    assert class_counts(10_000, weights, seed=3) == {
        "akiec": 1000, "bcc": 1500, "bkl": 1000, "df": 500, "mel": 1500, "nv": 4000, "vasc": 500
    }  # fmt: skip


def test_class_mix_comes_from_weights_the_distribution_or_equal_shares(tmp_path):
    codes = resolve_codes("all")
    assert class_mix(codes, 14, 0) == dict.fromkeys(labels.CODES, 2)
    assert class_mix(codes, 10, 0, {"mel": 0.8, "nv": 0.2}) == {"mel": 8, "nv": 2}
    csv = tmp_path / "dist.csv"
    pd.DataFrame(
        {"dx": ["mel", "mel", "nv", "bcc"], "sex": ["male", "female", "female", "male"], "weight": [2, 1, 1, 4]}
    ).to_csv(csv, index=False)
    dist = read_distribution(csv)
    assert class_mix(codes, 16, 0, distribution=dist) == {"bcc": 8, "mel": 6, "nv": 2}
    assert class_mix(("mel", "nv"), 8, 0, distribution=dist) == {"mel": 6, "nv": 2}  # bcc is not asked for
    assert class_mix(("mel", "nv"), 8, 0, {"mel": 0.5, "nv": 0.5}, dist) == {"mel": 4, "nv": 4}  # weights win
    with pytest.raises(InputError, match=r"--class_weights: weights bcc, which --condition leaves out \(mel, nv\)"):
        class_mix(("mel", "nv"), 8, 0, {"mel": 0.5, "bcc": 0.5})
    with pytest.raises(InputError, match="dist.csv: has no rows for df, vasc; add rows for them or pass --class_w"):
        class_mix(("df", "vasc"), 8, 0, distribution=dist)


def test_a_class_mix_plan_is_exact_per_class_and_balanced_over_the_whole_set():
    weights = parse_class_weights(["nv=0.4,mel=0.15,bcc=0.15,bkl=0.1,akiec=0.1,df=0.05,vasc=0.05"])
    mix = class_mix(resolve_codes("all"), 1003, 5, weights)
    plan = build_plan(resolve_codes("all"), mix, seed=5, balance=["skin_tone"])
    assert len(plan) == 1003 and Counter(s.dx for s in plan) == mix
    assert {s.image_id for s in plan if s.dx == "df"} == {f"df_{i:06d}" for i in range(mix["df"])}
    # each class's leftovers start where the last one's ended: the whole set is even, not only each class
    whole = Counter(s.skin_tone for s in plan)
    assert set(whole) == set(labels.SKIN_TONE_NAMES) and max(whole.values()) - min(whole.values()) <= 1
    for seed in range(4):
        plan = build_plan(resolve_codes("all"), class_mix(resolve_codes("all"), 997, seed, weights), seed=seed,
                          balance=["skin_tone", "sex"])  # fmt: skip
        for dx in labels.CODES:
            for field in ("skin_tone", "sex"):
                per_class = Counter(getattr(s, field) for s in plan if s.dx == dx)
                assert max(per_class.values()) - min(per_class.values()) <= 1


def test_the_plan_description_counts_each_class_and_subgroup_summing_to_the_total():
    plan = build_plan(("mel", "nv"), {"mel": 5, "nv": 2}, seed=0, balance=["sex"], guidance_scales=[3.0], steps=[10])
    lines = describe_plan(summarize_plan(plan))
    sexes = Counter(s.sex for s in plan)
    assert sorted(sexes.values()) == [3, 4]
    assert lines[:3] == [
        "plan: 7 images",
        "  class: mel 5, nv 2",
        f"  sex: male {sexes['male']}, female {sexes['female']}",
    ]
    assert lines[3:] == ["  guidance_scale: 3 (7)", "  num_inference_steps: 10 (7)"]  # unset fields say nothing
    for line in lines[1:3]:
        assert sum(int(part.rsplit(" ", 1)[1]) for part in line.split(": ")[1].split(", ")) == 7


def test_a_plan_too_large_to_hold_is_refused_before_it_is_built():
    """Issue 32: --num_images 10000000 built the plan in memory for minutes with no output."""
    with pytest.raises(
        InputError,
        match=r"^--num_images 10000000: plans 10,000,000 images, which need about 10 GB of memory and 12 minutes to "
        r"plan, then about 19 days to generate at 6 images/s .*; ask for at most 1,000,000 images per run; for more, "
        r"run several with different --seed and --output_dir$",
    ):
        build_plan(("mel",), 10_000_000)
    with pytest.raises(InputError, match=r"^--num_images 200000: plans 1,400,000 images"):
        build_plan(labels.CODES, 200_000)  # the limit is on the whole plan, over all conditions
    with pytest.raises(InputError, match=r"^--total_images 1000001: plans 1,000,001 images"):
        build_plan(labels.CODES, {"mel": MAX_PLAN_IMAGES, "nv": 1})


# A classifier's validation results: mel is missed, brown skin is its worst ranked tone, dark skin too small to rank.
TONES = {
    "very light": (0.9, 40), "light": (0.8, 30), "intermediate": (0.8, 20), "tan": (0.6, 10), "brown": (0.3, 8),
    "dark": (0.0, 2),
}  # fmt: skip
SEXES = {"male": (0.7, 50), "female": (0.75, 50), "unknown": (0.1, 10)}


def test_targeted_weights_follow_the_formula_towards_the_weakest_class_and_group(tmp_path):
    path = write_metrics(tmp_path / "metrics.json", {"mel": 0.2, "nv": 0.9, "bcc": None}, skin_tone=TONES, sex=SEXES)
    target = targets.read_target(path, ("mel", "nv"), None, list(BALANCE_VALUES))
    assert target.classes == pytest.approx({"mel": 0.85, "nv": 0.15})  # (1 - 0.2) + 0.05 : (1 - 0.9) + 0.05
    assert class_mix(("mel", "nv"), 100, 0, target.classes) == {"mel": 85, "nv": 15}
    # bcc has no validation images: it takes the mean weight (0.85 + 0.15) / 2
    assert targets.read_target(path, ("mel", "nv", "bcc"), None, []).classes == pytest.approx(
        {"mel": 0.85 / 1.5, "nv": 0.15 / 1.5, "bcc": 0.5 / 1.5}
    )
    # the field whose worst ranked group scores lowest: brown 0.3 (dark's 0.0 on 2 images and sex unknown do not rank)
    assert target.field == "skin_tone" and target.untargeted == ("dark",)
    # weights 0.15, 0.25, 0.25, 0.45, 0.75 and dark the mean 0.37, of 2.22: 222 images of one class split exactly
    plan = build_plan(("mel",), {"mel": 222}, distribution=target.distribution())
    assert Counter(s.skin_tone for s in plan) == {
        "very light": 15, "light": 25, "intermediate": 25, "tan": 45, "brown": 75, "dark": 37,
    }  # fmt: skip
    # with skin tone fixed by the run, the worst free field is sex; its 'unknown' is not a group a prompt states
    by_sex = targets.read_target(path, ("mel",), None, ["sex", "age_bin", "site_group"])
    assert by_sex.field == "sex" and by_sex.groups == pytest.approx({"male": 0.35 / 0.65, "female": 0.3 / 0.65})
    assert Counter(s.sex for s in build_plan(("mel",), 13, distribution=by_sex.distribution())) == {
        "male": 7,
        "female": 6,
    }
    assert targets.read_target(path, ("mel",), None, []).distribution() is None


def test_the_target_is_described_with_its_formula_and_weights(tmp_path):
    path = write_metrics(tmp_path / "metrics.json", {"mel": 0.2, "nv": 0.9}, skin_tone=TONES)
    assert targets.read_target(path, ("mel", "nv"), "skin_tone", []).describe() == [
        f"  target (from {path}): weight = (1 - recall) + 0.05, normalised: mel 0.85, nv 0.15",
        "  target skin_tone within each class: weight = (1 - accuracy) + 0.05, normalised: very light 0.07, "
        "light 0.11, intermediate 0.11, tan 0.20, brown 0.34, dark 0.17 (not ranked: mean)",
    ]
    assert targets.read_target(path, ("mel", "nv"), None, []).describe()[1] == (
        "  target subgroups: none (no field that the prompts state and the run leaves free has two ranked groups)"
    )


def test_the_metrics_eval_py_computes_are_read_as_a_target(tmp_path):
    """The shape comes from the functions classification/eval.py scores with, not from a hand-written file."""
    y_true = ["mel"] * 10 + ["nv"] * 10
    y_pred = ["mel"] * 2 + ["nv"] * 8 + ["nv"] * 9 + ["mel"]
    tones = ["light"] * 5 + ["brown"] * 5 + ["light"] * 5 + ["very light"] * 5
    result = {
        "overall": classification_metrics(y_true, y_pred),
        "subgroups": subgroup_metrics(y_true, y_pred, {"skin_tone": tones, "sex": ["unknown"] * 20}, 5),
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(result), encoding="utf-8")
    target = targets.read_target(path, ("mel", "nv"), None, list(BALANCE_VALUES))
    assert target.classes == pytest.approx({"mel": 0.85, "nv": 0.15})
    # light 7/10 right, brown 0/5, very light 4/5; the tones without images take the mean
    assert target.field == "skin_tone" and target.untargeted == ("intermediate", "tan", "dark")
    assert target.groups["brown"] > target.groups["light"] > target.groups["very light"]


def test_a_bad_target_is_one_line_naming_the_file_or_flag(tmp_path):
    expected = "pass --target a metrics.json from classification/eval.py"
    (tmp_path / "m.json").write_text('{"accuracy": 0.5}')
    (tmp_path / "l.json").write_text('{"overall": [], "subgroups": {}}')
    (tmp_path / "g.json").write_text('{"overall": {"per_class": {}}, "subgroups": {"sex": {"groups": {"male": 0.5}}}}')
    (tmp_path / "t.txt").write_text("mel 0.2")
    (tmp_path / "r.json").write_text('{"overall": {"per_class": {"mel": {"recall": 2}}}, "subgroups": {}}')
    cases = {
        "m.json: is not a classifier's metrics.json; " + expected: tmp_path / "m.json",
        "l.json: is not a classifier's metrics.json; " + expected: tmp_path / "l.json",
        "g.json: is not a classifier's metrics.json; " + expected: tmp_path / "g.json",
        "t.txt: is not JSON (Expecting value at line 1); " + expected: tmp_path / "t.txt",
        "r.json: holds a recall or accuracy of 2; " + expected: tmp_path / "r.json",
        "none.json: not found; " + expected: tmp_path / "none.json",
    }
    for message, path in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            targets.read_target(path, ("mel",), None, [])
    path = write_metrics(tmp_path / "metrics.json", {"mel": 0.2}, skin_tone=TONES, sex=SEXES)
    with pytest.raises(InputError, match="^--target_field: 'colour' is not a subgroup field; choose from sex, age_bin"):
        targets.read_target(path, ("mel",), "colour", [])
    with pytest.raises(InputError, match=f"^--target_field: {re.escape(str(path))} ranks fewer than two age_bin grou"):
        targets.read_target(path, ("mel",), "age", [])
    with pytest.raises(InputError, match="metrics.json: has no recall for nv; score the classifier on images of them"):
        targets.read_target(path, ("nv",), None, [])
