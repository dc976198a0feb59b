import warnings

import numpy as np
import pandas as pd
import pytest

from lesiongen.captions.splits import d7p_official_splits, grouped_kfold, split_by_lesion
from lesiongen.errors import InputError


@pytest.fixture(scope="module")
def ham(ham_csv):
    return pd.read_csv(ham_csv)


def test_no_lesion_in_two_splits_and_proportions_hold(ham):
    splits = pd.Series(split_by_lesion(list(ham.dx), list(ham.lesion_id), seed=0))
    assert splits.value_counts(normalize=True)["train"] == pytest.approx(0.8, abs=0.02)
    per_lesion = pd.DataFrame({"lesion": ham.lesion_id, "split": splits}).groupby("lesion")["split"].nunique()
    assert per_lesion.max() == 1
    whole = ham.dx.value_counts(normalize=True)
    for name in ("train", "validation", "test"):
        part = ham.dx[splits == name].value_counts(normalize=True)
        assert (part - whole).abs().max() < 0.03, name


def test_split_is_seeded(ham):
    a = split_by_lesion(list(ham.dx), list(ham.lesion_id), seed=1)
    assert a == split_by_lesion(list(ham.dx), list(ham.lesion_id), seed=1)
    assert a != split_by_lesion(list(ham.dx), list(ham.lesion_id), seed=2)


def test_grouped_kfold_keeps_lesions_together(ham):
    folds = grouped_kfold(list(ham.dx), list(ham.lesion_id), 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(ham)))
    lesion_sets = [set(ham.lesion_id.iloc[f]) for f in folds]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not lesion_sets[i] & lesion_sets[j]


def test_bad_fractions_and_too_many_folds():
    with pytest.raises(InputError, match="sum to 1"):
        split_by_lesion(["a", "b"], ["1", "2"], (0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="distinct lesions"):
        grouped_kfold(["a", "b"], ["1", "1"], 2)


def test_official_d7p_split(d7p_csv):
    splits = d7p_official_splits(d7p_csv.parent, 1011)
    assert (splits.count("train"), splits.count("validation"), splits.count("test")) == (413, 203, 395)
    with pytest.raises(InputError, match="outside meta.csv's 100 rows"):
        d7p_official_splits(d7p_csv.parent, 100)


def test_unreadable_index_files_name_the_file(tmp_path, d7p_csv):
    import shutil

    for name in ("train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"):
        shutil.copy(d7p_csv.parent / name, tmp_path / name)
    (tmp_path / "valid_indexes.csv").write_text("row\n1\n2\n")
    with pytest.raises(InputError, match="valid_indexes.csv: has no 'indexes' column \\(has: row\\)"):
        d7p_official_splits(tmp_path, 1011)
    (tmp_path / "valid_indexes.csv").write_bytes(b"indexes\n1\n\xff\xfe\n")
    with pytest.raises(InputError, match="valid_indexes.csv line 3: is not UTF-8"):
        d7p_official_splits(tmp_path, 1011)


def test_classes_too_small_for_the_default_split_are_one_line_naming_them(capsys):
    few = ["mel"] * 5 + ["nv"] * 6
    with pytest.raises(InputError, match=r"largest class, nv, has 6 images.*--split_fractions 0.6 0.2 0.2") as e:
        split_by_lesion(few, [str(i) for i in range(11)])
    assert e.value.where == "--split_fractions"
    assert set(split_by_lesion(few, [str(i) for i in range(11)], (0.6, 0.2, 0.2))) == {"train", "validation", "test"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's own warning is replaced by the line below
        split_by_lesion(["nv"] * 30 + ["df"] * 3, [str(i) for i in range(33)])
    assert "fewer than 10 lesions may miss the validation or test split: df (3)" in capsys.readouterr().out
