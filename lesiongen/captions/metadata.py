"""Read and validate HAM10000 and Derm7pt metadata into ``LesionRecord`` rows (pandas only).

Every problem is reported as ``InputError`` naming the file, the CSV line and the fix; with
``skip_bad_rows`` a bad row is skipped and counted instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .. import labels
from ..errors import InputError, not_utf8


@dataclass
class LesionRecord:
    image_id: str
    lesion_id: str
    dataset: str
    dx: str
    diagnosis: str = ""
    dx_type: str | None = None
    age: float | None = None
    sex: str = "unknown"
    site: str = "unknown"
    elevation: str | None = None
    skin_tone: str = "unknown"
    concepts: dict[str, str] = field(default_factory=dict)
    concept_source: str = "none"  # expert (Derm7pt) | metadata (given in a HAM-schema CSV) | imputed | none
    image_path: str | None = None  # as named by the metadata, relative to the images folder

    @property
    def age_bin(self) -> str:
        return labels.age_bin(self.age)

    @property
    def site_group(self) -> str:
        return labels.site_group(self.site)

    def to_row(self) -> dict:
        """Flat JSON-able row: concepts become top-level columns so every reader sees one schema."""
        row = asdict(self)
        concepts = row.pop("concepts")
        for name in labels.CONCEPT_NAMES:
            row[name] = concepts.get(name)
        row["age_bin"] = self.age_bin
        row["site_group"] = self.site_group
        return row

    @classmethod
    def from_row(cls, row: dict) -> LesionRecord:
        concepts = {n: row[n] for n in labels.CONCEPT_NAMES if row.get(n) is not None}
        kwargs = {k: row.get(k) for k in cls.__dataclass_fields__ if k != "concepts" and k in row}
        age = kwargs.get("age")
        kwargs["age"] = None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age)
        return cls(**kwargs, concepts=concepts)


@dataclass
class LoadResult:
    records: list[LesionRecord]
    skipped: list[str]  # one message per skipped row
    rows: list[int]  # 0-based CSV row of each record, for index-based official splits
    n_rows: int  # data rows in the file, kept or skipped: what an official split's indexes count


HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
D7P_COLUMNS = ("case_num", "diagnosis", *labels.CONCEPT_NAMES, "elevation", "location", "sex", "derm")


def read_csv(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a metadata CSV as strings; missing file, non-CSV, empty file and missing columns are errors."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not the metadata CSV", "pass the CSV file inside it to --metadata")
    if not path.is_file():
        raise InputError(path, "metadata file not found", "check the --metadata path")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise InputError(path, "the CSV file is empty", "export the metadata again with its header row") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.ParserError as e:
        detail = str(e).strip().splitlines()[-1][:200]
        raise InputError(path, f"is not a readable CSV file ({detail})", "check it is the metadata CSV") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            path,
            f"missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})",
            "is this the right --dataset? rename the columns to the documented names",
        )
    if df.empty:
        raise InputError(path, "the CSV has a header but no rows", "export the metadata again")
    return df


def parse_age(text: str) -> float | None:
    """Empty cells are unknown age (HAM10000 leaves 57 blank); text or out-of-range values are errors."""
    text = text.strip()
    if text == "" or text.lower() in ("nan", "na", "unknown"):
        return None
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"age '{text}' is not a number") from None
    if not 0 <= age <= labels.MAX_AGE:
        raise ValueError(f"age {text} is outside 0..{labels.MAX_AGE}")
    return age


def parse_sex(text: str) -> str:
    sex = text.strip().lower() or "unknown"
    if sex not in labels.SEXES:
        raise ValueError(f"sex '{text}' is not one of {', '.join(labels.SEXES)}")
    return sex


def _ham_row(r: dict) -> LesionRecord:
    dx = r["dx"].strip().lower()
    if dx not in labels.BY_CODE:
        raise ValueError(f"unknown dx code '{r['dx']}' (valid: {', '.join(labels.CODES)})")
    site = r["localization"].strip().lower() or "unknown"
    if site not in labels.SITE_GROUPS:
        raise ValueError(f"unknown localization '{r['localization']}' (valid: {', '.join(labels.SITES)})")
    dx_type = r["dx_type"].strip().lower() or None
    if dx_type is not None and dx_type not in labels.DX_TYPES:
        raise ValueError(f"unknown dx_type '{r['dx_type']}' (valid: {', '.join(labels.DX_TYPES)})")
    image_id = r["image_id"].strip()
    if not image_id:
        raise ValueError("empty image_id")
    concepts = _optional_concepts(r)
    return LesionRecord(
        image_id=image_id,
        lesion_id=r["lesion_id"].strip() or image_id,
        dataset="ham10000",
        dx=dx,
        diagnosis=labels.BY_CODE[dx].phrase,
        dx_type=dx_type,
        age=parse_age(r["age"]),
        sex=parse_sex(r["sex"]),
        site=site,
        skin_tone=_skin_tone(r.get("skin_tone", "")),
        concepts=concepts,
        concept_source="metadata" if concepts else "none",
        image_path=None,
    )


def _skin_tone(text: str) -> str:
    tone = (text or "").strip().lower() or "unknown"
    if tone not in (*labels.SKIN_TONE_NAMES, "unknown"):
        raise ValueError(f"skin_tone '{text}' is not one of {', '.join(labels.SKIN_TONE_NAMES)}")
    return tone


def _optional_concepts(r: dict) -> dict[str, str]:
    """Checklist columns in a HAM-schema CSV (e.g. the demo data) are used when every one is filled."""
    if not all((r.get(name) or "").strip() for name in labels.CONCEPT_NAMES):
        return {}
    concepts = {}
    for concept in labels.CONCEPTS:
        value = r[concept.name].strip().lower()
        if value not in concept.values:
            raise ValueError(f"{concept.name} '{r[concept.name]}' is not one of {', '.join(concept.values)}")
        concepts[concept.name] = value
    return concepts


def _d7p_row(r: dict) -> LesionRecord:
    diagnosis = r["diagnosis"].strip().lower()
    try:
        dx = labels.d7p_to_code(diagnosis)
    except KeyError:
        raise ValueError(f"unknown Derm7pt diagnosis '{r['diagnosis']}' (add it to labels.CONDITIONS)") from None
    concepts = _optional_concepts(r)
    if not concepts:
        raise ValueError("a checklist concept is empty")
    location = r["location"].strip().lower()
    site = labels.D7P_SITES.get(location)
    if site is None:
        raise ValueError(f"unknown location '{r['location']}' (valid: {', '.join(labels.D7P_SITES)})")
    derm = r["derm"].strip()
    if not derm:
        raise ValueError("empty 'derm' image path")
    case = r["case_num"].strip()
    elevation = r["elevation"].strip().lower() or None
    return LesionRecord(
        image_id=Path(derm).with_suffix("").as_posix().replace("/", "_"),
        lesion_id=f"d7p_case_{case}",
        dataset="d7p",
        dx=dx,
        diagnosis=diagnosis,
        age=parse_age(r["age"]) if "age" in r else None,
        sex=parse_sex(r["sex"]),
        site=site,
        elevation=elevation,
        concepts=concepts,
        concept_source="expert",
        image_path=derm,
    )


def _load(
    path: str | Path, columns: tuple[str, ...], parse: Callable[[dict], LesionRecord], skip_bad_rows: bool
) -> LoadResult:
    df = read_csv(path, columns)
    records: list[LesionRecord] = []
    skipped: list[str] = []
    rows: list[int] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(df.to_dict("records")):
        line = i + 2  # the header is line 1
        try:
            rec = parse(row)
            if rec.image_id in seen:
                raise ValueError(f"image_id '{rec.image_id}' repeats line {seen[rec.image_id]}")
        except ValueError as e:
            if not skip_bad_rows:
                raise InputError(f"{path} line {line}", str(e), "fix the value or pass --skip_bad_rows") from None
            skipped.append(f"line {line}: {e}")
            continue
        seen[rec.image_id] = line
        records.append(rec)
        rows.append(i)
    if not records:
        raise InputError(path, "no usable rows", "check the file and --dataset")
    return LoadResult(records, skipped, rows, len(df))


def load_ham10000(path: str | Path, skip_bad_rows: bool = False) -> LoadResult:
    return _load(path, HAM_COLUMNS, _ham_row, skip_bad_rows)


def load_d7p(path: str | Path, skip_bad_rows: bool = False) -> LoadResult:
    return _load(path, D7P_COLUMNS, _d7p_row, skip_bad_rows)


LOADERS: dict[str, Callable[..., LoadResult]] = {"ham10000": load_ham10000, "d7p": load_d7p}


def load_metadata(dataset: str, path: str | Path, skip_bad_rows: bool = False) -> LoadResult:
    if dataset not in LOADERS:
        raise InputError("--dataset", f"unknown dataset '{dataset}'", f"choose one of {', '.join(LOADERS)}")
    return LOADERS[dataset](path, skip_bad_rows)
