"""The one place where condition names, dx codes, concepts and subgroup bins are spelled.

Every other module imports these tables; the number of classes is ``len(CONDITIONS)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    code: str  # HAM10000 dx code, the label carried through all data
    name: str  # display name of the original LesionGen README (folder names, CLI)
    phrase: str  # how a caption says it
    d7p_diagnoses: tuple[str, ...]  # Derm7pt diagnosis strings grouped into this class


# Derm7pt's 20 diagnoses grouped onto HAM10000's seven classes. Melanosis and lentigo are benign
# pigmented keratinocytic/melanotic macules that HAM10000 files under "bkl" (solar lentigo); all nevus
# subtypes (Clark, Reed/Spitz, blue, dermal, congenital, combined, recurrent) are melanocytic nevi.
# Derm7pt has no actinic keratosis. "miscellaneous" fits none and maps to OTHER.
CONDITIONS: tuple[Condition, ...] = (
    Condition(
        "akiec",
        "Actinic keratoses and intraepithelial carcinoma",
        "actinic keratosis or intraepithelial carcinoma",
        (),
    ),
    Condition("bcc", "Basal cell carcinoma", "basal cell carcinoma", ("basal cell carcinoma",)),
    Condition(
        "bkl",
        "Benign keratosis-like lesions",
        "benign keratosis-like lesion",
        ("seborrheic keratosis", "lentigo", "melanosis"),
    ),
    Condition("df", "Dermatofibroma", "dermatofibroma", ("dermatofibroma",)),
    Condition(
        "mel",
        "Melanoma",
        "melanoma",
        (
            "melanoma",
            "melanoma (in situ)",
            "melanoma (less than 0.76 mm)",
            "melanoma (0.76 to 1.5 mm)",
            "melanoma (more than 1.5 mm)",
            "melanoma metastasis",
        ),
    ),
    Condition(
        "nv",
        "Melanocytic nevi",
        "melanocytic nevus",
        (
            "blue nevus",
            "clark nevus",
            "combined nevus",
            "congenital nevus",
            "dermal nevus",
            "recurrent nevus",
            "reed or spitz nevus",
        ),
    ),
    Condition("vasc", "Vascular lesions", "vascular lesion", ("vascular lesion",)),
)

OTHER = "other"
D7P_OTHER_DIAGNOSES: tuple[str, ...] = ("miscellaneous",)

CODES: tuple[str, ...] = tuple(c.code for c in CONDITIONS)
# The classes a benign/malignant reading calls malignant (ISIC's convention: melanoma, basal cell carcinoma,
# actinic keratosis and intraepithelial carcinoma); the audit's flip directions and true-positive rates use it.
MALIGNANT: frozenset[str] = frozenset({"mel", "bcc", "akiec"})
BY_CODE: dict[str, Condition] = {c.code: c for c in CONDITIONS}


def condition(name_or_code: str) -> Condition:
    """Resolve a display name or dx code, case-insensitively; unknown names list the valid ones."""
    key = name_or_code.strip().lower()
    for c in CONDITIONS:
        if key in (c.code, c.name.lower()):
            return c
    valid = ", ".join(f"'{c.name}' ({c.code})" for c in CONDITIONS)
    raise KeyError(f"unknown condition '{name_or_code}'; valid: {valid}")


def d7p_to_code(diagnosis: str) -> str:
    """Map a Derm7pt diagnosis to a dx code, or OTHER; raises KeyError for a diagnosis not in the table."""
    key = diagnosis.strip().lower()
    for c in CONDITIONS:
        if key in c.d7p_diagnoses:
            return c.code
    if key in D7P_OTHER_DIAGNOSES:
        return OTHER
    raise KeyError(diagnosis)


# The seven-point checklist (Argenziano 1998) as annotated in Derm7pt, with each value's caption
# phrase. "absent" is phrased per concept so a caption can state absences explicitly.
@dataclass(frozen=True)
class Concept:
    name: str
    values: tuple[str, ...]
    phrases: dict[str, str]
    absent_phrase: str


CONCEPTS: tuple[Concept, ...] = (
    Concept(
        "pigment_network",
        ("absent", "typical", "atypical"),
        {"typical": "typical pigment network", "atypical": "atypical pigment network"},
        "no pigment network",
    ),
    Concept(
        "streaks",
        ("absent", "regular", "irregular"),
        {"regular": "regular streaks", "irregular": "irregular streaks"},
        "no streaks",
    ),
    Concept(
        "pigmentation",
        ("absent", "diffuse regular", "localized regular", "diffuse irregular", "localized irregular"),
        {
            "diffuse regular": "diffuse regular pigmentation",
            "localized regular": "localized regular pigmentation",
            "diffuse irregular": "diffuse irregular pigmentation",
            "localized irregular": "localized irregular pigmentation",
        },
        "no blotches",
    ),
    Concept(
        "regression_structures",
        ("absent", "blue areas", "white areas", "combinations"),
        {
            "blue areas": "blue regression areas",
            "white areas": "white scar-like regression",
            "combinations": "blue and white regression structures",
        },
        "no regression",
    ),
    Concept(
        "dots_and_globules",
        ("absent", "regular", "irregular"),
        {"regular": "regular dots and globules", "irregular": "irregular dots and globules"},
        "no dots or globules",
    ),
    Concept(
        "blue_whitish_veil",
        ("absent", "present"),
        {"present": "blue-whitish veil"},
        "no blue-whitish veil",
    ),
    Concept(
        "vascular_structures",
        (
            "absent",
            "arborizing",
            "comma",
            "hairpin",
            "within regression",
            "wreath",
            "dotted",
            "linear irregular",
        ),
        {
            "arborizing": "arborizing vessels",
            "comma": "comma vessels",
            "hairpin": "hairpin vessels",
            "within regression": "vessels within regression",
            "wreath": "wreath vessels",
            "dotted": "dotted vessels",
            "linear irregular": "linear irregular vessels",
        },
        "no vessels",
    ),
)
CONCEPT_NAMES: tuple[str, ...] = tuple(c.name for c in CONCEPTS)
CONCEPT_BY_NAME: dict[str, Concept] = {c.name: c for c in CONCEPTS}

# Body sites: HAM10000 'localization' and Derm7pt 'location' normalised to one vocabulary, and
# each site's coarse group for subgroup metrics (small groups such as 'ear' would be pure noise).
SITE_GROUPS: dict[str, str] = {
    "scalp": "head and neck",
    "ear": "head and neck",
    "face": "head and neck",
    "neck": "head and neck",
    "head and neck": "head and neck",
    "back": "trunk",
    "trunk": "trunk",
    "chest": "trunk",
    "abdomen": "trunk",
    "buttocks": "trunk",
    "genital": "trunk",
    "upper extremity": "upper extremity",
    "hand": "upper extremity",
    "lower extremity": "lower extremity",
    "foot": "lower extremity",
    "acral": "acral",
    "unknown": "unknown",
}
D7P_SITES: dict[str, str] = {
    "head neck": "head and neck",
    "upper limbs": "upper extremity",
    "lower limbs": "lower extremity",
    "genital areas": "genital",
    "abdomen": "abdomen",
    "back": "back",
    "chest": "chest",
    "acral": "acral",
    "buttocks": "buttocks",
}
SITES: tuple[str, ...] = tuple(SITE_GROUPS)


def site_group(site: str) -> str:
    return SITE_GROUPS.get(site, "unknown")


SITE_GROUP_NAMES: tuple[str, ...] = tuple(dict.fromkeys(SITE_GROUPS.values()))

SEXES: tuple[str, ...] = ("male", "female", "unknown")

# Age bins for subgroup metrics and generation plans; HAM10000 ages are rounded to 5 years.
AGE_BINS: tuple[tuple[str, float, float], ...] = (
    ("0-29", 0, 30),
    ("30-44", 30, 45),
    ("45-59", 45, 60),
    ("60-74", 60, 75),
    ("75+", 75, 200),
)
AGE_BIN_NAMES: tuple[str, ...] = tuple(b[0] for b in AGE_BINS)
AGE_BIN_MIDPOINTS: dict[str, int] = {"0-29": 25, "30-44": 40, "45-59": 50, "60-74": 65, "75+": 80}
MAX_AGE = 120


def age_bin(age: float | None) -> str:
    if age is None:
        return "unknown"
    for name, lo, hi in AGE_BINS:
        if lo <= age < hi:
            return name
    return "unknown"


# Skin tone bands of the individual typology angle (Chardon et al. 1991; Del Bino & Bernerd 2013),
# lower bound in degrees, lightest first.
SKIN_TONES: tuple[tuple[str, float], ...] = (
    ("very light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", float("-inf")),
)
SKIN_TONE_NAMES: tuple[str, ...] = tuple(t[0] for t in SKIN_TONES)


def skin_tone_from_ita(ita: float | None) -> str:
    if ita is None:
        return "unknown"
    for name, lower in SKIN_TONES:
        if ita > lower:
            return name
    return "dark"


def skin_tone_ita(name: str) -> float:
    """The ITA an edit to this tone aims for: a bounded band's middle, 10 degrees inside an open band's bound."""
    i = SKIN_TONE_NAMES.index(name)
    lower = SKIN_TONES[i][1]
    if i == 0:
        return lower + 10.0
    upper = SKIN_TONES[i - 1][1]
    return upper - 10.0 if lower == float("-inf") else (lower + upper) / 2


DX_TYPES: dict[str, str] = {
    "histo": "confirmed by histopathology",
    "follow_up": "confirmed by follow-up",
    "consensus": "diagnosed by expert consensus",
    "confocal": "confirmed by confocal microscopy",
}

# Subgroup fields carried by every record, used by metrics and generation plans.
SUBGROUP_FIELDS: tuple[str, ...] = ("sex", "age_bin", "site_group", "skin_tone")
