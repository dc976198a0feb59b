import pandas as pd
import pytest

from lesiongen.captions.metadata import LesionRecord, load_d7p, load_ham10000, load_metadata
from lesiongen.errors import InputError


def test_ham10000_loads_every_row(ham_csv):
    result = load_ham10000(ham_csv)
    assert len(result.records) == 10015 and result.skipped == []
    assert sum(r.age is None for r in result.records) == 57
    assert {r.dx for r in result.records} == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}


def test_d7p_loads_concepts_as_expert(d7p_csv):
    result = load_d7p(d7p_csv)
    assert len(result.records) == 1011
    first = result.records[0]
    assert first.dx == "bcc" and first.concept_source == "expert"
    assert first.concepts["vascular_structures"] == "arborizing"
    assert first.image_path == "NEL/Nel026.jpg" and first.site == "abdomen"


def test_row_round_trip(d7p_csv):
    for rec in load_d7p(d7p_csv).records[:50]:
        assert LesionRecord.from_row(rec.to_row()) == rec


def write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


@pytest.mark.parametrize(
    "body,message",
    [
        ("L1,I1,xyz,histo,50,male,back\n", r"line 2: unknown dx code 'xyz'"),
        ("L1,I1,mel,histo,abc,male,back\n", r"line 2: age 'abc' is not a number"),
        ("L1,I1,mel,histo,250,male,back\n", r"line 2: age 250 is outside"),
        ("L1,I1,mel,histo,50,robot,back\n", r"sex 'robot'"),
        ("L1,I1,mel,histo,50,male,moon\n", r"unknown localization 'moon'"),
        ("L1,I1,mel,histo,50,male,back\nL2,I1,nv,histo,40,male,back\n", r"line 3: image_id 'I1' repeats line 2"),
    ],
)
def test_bad_rows_name_file_line_and_fix(tmp_path, body, message):
    path = write(tmp_path, HEADER + body)
    with pytest.raises(InputError, match=message) as err:
        load_ham10000(path)
    assert str(path) in str(err.value) and "--skip_bad_rows" in str(err.value)


def test_skip_bad_rows_counts(tmp_path):
    path = write(tmp_path, HEADER + "L1,I1,mel,histo,50,male,back\nL2,I2,xyz,histo,50,male,back\nL3,I3,nv,,,female,\n")
    result = load_ham10000(path, skip_bad_rows=True)
    assert [r.image_id for r in result.records] == ["I1", "I3"]
    assert len(result.skipped) == 1 and "line 3" in result.skipped[0]
    assert result.records[1].age is None and result.records[1].site == "unknown"


def test_file_level_errors(tmp_path):
    with pytest.raises(InputError, match="metadata file not found"):
        load_ham10000(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="is a folder, not the metadata CSV; pass the CSV file inside it"):
        load_ham10000(tmp_path)
    with pytest.raises(InputError, match="the CSV file is empty"):
        load_ham10000(write(tmp_path, ""))
    with pytest.raises(InputError, match="header but no rows"):
        load_ham10000(write(tmp_path, HEADER))
    with pytest.raises(InputError, match="missing column.*localization"):
        load_ham10000(write(tmp_path, "lesion_id,image_id,dx,dx_type,age,sex\nL,I,mel,histo,1,male\n"))
    binary = tmp_path / "image.jpg"
    binary.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(InputError, match="image.jpg"):
        load_ham10000(binary)
    with pytest.raises(InputError, match="unknown dataset 'isic'"):
        load_metadata("isic", binary)


def test_d7p_bad_concept_and_diagnosis(tmp_path, d7p_csv):
    df = pd.read_csv(d7p_csv, dtype=str, keep_default_na=False).head(3)
    df.loc[1, "streaks"] = "wavy"
    with pytest.raises(InputError, match="line 3: streaks 'wavy'"):
        load_d7p(write(tmp_path, df.to_csv(index=False)))
    df.loc[1, "streaks"] = "absent"
    df.loc[2, "diagnosis"] = "lichen planus"
    with pytest.raises(InputError, match="line 4: unknown Derm7pt diagnosis 'lichen planus'"):
        load_d7p(write(tmp_path, df.to_csv(index=False)))


def test_ham_schema_with_concepts_and_skin_tone(tmp_path):
    header = (
        HEADER.strip()
        + ",skin_tone,pigment_network,streaks,pigmentation,regression_structures,dots_and_globules,blue_whitish_veil,vascular_structures\n"
    )
    row = "L1,I1,mel,histo,50,male,back,tan,atypical,irregular,absent,absent,irregular,present,absent\n"
    rec = load_ham10000(write(tmp_path, header + row)).records[0]
    assert rec.skin_tone == "tan" and rec.concept_source == "metadata"
    assert rec.concepts["blue_whitish_veil"] == "present"


def test_a_csv_that_is_not_utf8_names_the_line_and_how_to_convert_it(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "L1,I1,mel,histo,50,male,back\nL2,I2,nv,histo,40,female,épaule\n").encode("latin-1"))
    with pytest.raises(
        InputError, match=r"latin1.csv line 3: is not UTF-8 text \(byte 0xe9\); if it is a CSV, save it as UTF-8"
    ):
        load_ham10000(path)
