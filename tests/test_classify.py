"""The classifier stage on real Derm7pt images: learning, ViT, resume, folds, comparison, bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision
from builders import RunsCode, oversized_png, subset
from huggingface_hub.errors import LocalEntryNotFoundError

from lesiongen import labels
from lesiongen.captions.metadata import load_metadata
from lesiongen.classify import train as classify
from lesiongen.classify.compare import difference_table, difference_text, differences
from lesiongen.classify.compare import main as compare_main
from lesiongen.classify.config import ClassifyConfig
from lesiongen.classify.convert_checkpoint import main as convert_main
from lesiongen.classify.data import MEAN, STD, check_classes, drop_corrupt, lesion_folds
from lesiongen.classify.evaluate import main as eval_main
from lesiongen.classify.models import BEST, FORMAT, LAST, build_model, export_for_timm, load_classifier, save_checkpoint
from lesiongen.classify.train import main as classifier_main
from lesiongen.classify.train import train
from lesiongen.cli import parse_config
from lesiongen.errors import InputError
from lesiongen.states import read_state, write_state
from lesiongen.tables import read_image_table


def quick(data_dir: Path, out: Path, **kw) -> ClassifyConfig:
    settings = dict(
        image_size=32,
        epochs=1,
        batch_size=16,
        num_workers=0,
        output_dir=str(out),
        resume_from_checkpoint=None,
        pretrained=False,
    )
    return ClassifyConfig(data_dir=str(data_dir), **{**settings, **kw})


def assert_timm_loads_the_classifier(out: Path) -> None:
    """The run's model.safetensors and config.json load in timm alone and compute what the LesionGen model does."""
    model, cfg, ckpt = load_classifier(out)
    config = json.loads((out / "config.json").read_text())
    n = len(labels.CODES)
    assert config["num_classes"] == n and config["label_names"] == list(labels.CODES)
    assert config["label_descriptions"]["mel"] == "Melanoma" and config["lesiongen"]["epoch"] == ckpt["epoch"]
    data = config["pretrained_cfg"]
    assert data["input_size"] == [3, cfg.image_size, cfg.image_size] and data["crop_pct"] == 1.0
    assert data["mean"] == list(MEAN) and data["std"] == list(STD)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    overlay = dict(file=str(out / "model.safetensors"), num_classes=n)
    by_file = timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **config["model_args"]
    )
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True)  # reads config.json, as hf-hub: does
    with torch.no_grad():
        expected = model(x)
        for loaded in (by_file.eval(), by_folder.eval()):
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


def test_resnet18_beats_majority_on_real_d7p(tmp_path, d7p_built):
    out = tmp_path / "r18"
    report = train(quick(d7p_built, out, epochs=5, lr=2e-3, batch_size=32))
    summary = report["runs"][0]
    assert summary["majority_baseline"]["balanced_accuracy"] == pytest.approx(1 / 6, abs=1e-6)  # 6 classes in valid
    assert report["skipped"] == {"train_label_other": 3, "validation_label_other": 3}
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    # scored again from the best checkpoint through the eval command, as a user would
    assert eval_main(["--checkpoint", str(out / BEST), "--data_dir", str(d7p_built), "--num_workers", "0"]) == 0
    metrics = json.loads((out / "eval-validation" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 200 and metrics["epoch"] == summary["best_epoch"]
    assert metrics["overall"]["balanced_accuracy"] == pytest.approx(summary["best_balanced_accuracy"], abs=1e-6)
    assert metrics["overall"]["balanced_accuracy"] > 1 / 6 + 0.05
    assert set(metrics["subgroups"]) == set(labels.SUBGROUP_FIELDS)
    assert (
        metrics["subgroups"]["sex"]["groups"]["male"]["n"] + metrics["subgroups"]["sex"]["groups"]["female"]["n"] == 200
    )
    table = pd.read_csv(out / "eval-validation" / "metrics.csv")
    assert table.iloc[0]["n"] == 200 and "site_group" in set(table["field"])
    preds = pd.read_csv(out / "eval-validation" / "predictions.csv")
    assert len(preds) == 200 and np.allclose(preds[[f"p_{c}" for c in labels.CODES]].sum(1), 1, atol=1e-3)
    png = (out / "eval-validation" / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "logs").iterdir())  # TensorBoard event file
    assert_timm_loads_the_classifier(out)


def test_vit_trains_and_evaluates(tmp_path, small_d7p):
    out = tmp_path / "vit"
    cfg = quick(small_d7p, out, model="vit", vit_name="vit_tiny_patch16_224", epochs=2, augment="flip", balance="loss")
    summary = train(cfg)["runs"][0]
    assert len(summary["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in summary["history"])
    model, model_cfg, _ = load_classifier(out)
    assert model_cfg.model == "vit" and model.patch_embed.img_size == (32, 32)
    assert_timm_loads_the_classifier(out)
    assert (
        eval_main(
            [
                "--checkpoint",
                str(out),
                "--data_dir",
                str(small_d7p),
                "--output_dir",
                str(tmp_path / "ev"),
                "--num_workers",
                "0",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["overall"]["n"] == len(read_image_table(small_d7p, "validation"))
    with pytest.raises(InputError, match="not a multiple of vit_tiny_patch16_224's patch size 16"):
        train(quick(small_d7p, tmp_path / "bad", model="vit", vit_name="vit_tiny_patch16_224", image_size=40))


def test_resnet18_is_the_originals_torchvision_network_from_the_same_seed(tmp_path, small_d7p):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=len(labels.CODES)).state_dict()
    torch.manual_seed(0)
    model = build_model(quick(small_d7p, tmp_path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())


def test_any_timm_architecture_is_one_flag_and_leaves_in_timm_layout(tmp_path, small_d7p):
    out = tmp_path / "mobilenet"
    cfg = parse_config(ClassifyConfig, ["--data_dir", str(small_d7p), "--model", "mobilenetv3_small_050"])
    assert cfg.pretrained  # ImageNet weights unless asked otherwise, as the original
    cfg = quick(small_d7p, out, model="mobilenetv3_small_050", image_size=48)
    model = build_model(cfg)
    save_checkpoint(out / BEST, model, cfg, epoch=1, extra={})
    export_for_timm(out, model, cfg, epoch=1)
    assert_timm_loads_the_classifier(out)
    with pytest.raises(InputError, match="--model: timm has no model 'resnet999'; pass a name from timm.list_models()"):
        build_model(quick(small_d7p, out, model="resnet999"))
    with pytest.raises(InputError, match="--pretrained: timm publishes no pretrained weights for botnet50ts_256"):
        build_model(quick(small_d7p, out, model="botnet50ts_256", pretrained=True))
    with pytest.raises(InputError, match="--vit_name: timm has no model 'vit_huge_patch3'"):
        build_model(quick(small_d7p, out, model="vit", vit_name="vit_huge_patch3"))


def test_resume_matches_uninterrupted_run(tmp_path, small_d7p, monkeypatch):
    full = tmp_path / "full"
    train(quick(small_d7p, full, epochs=2))
    part = tmp_path / "part"
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:  # killed during epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real_evaluate(*args)

    real_evaluate = classify.evaluate_frame
    monkeypatch.setattr(classify, "evaluate_frame", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(quick(small_d7p, part, epochs=2))
    monkeypatch.undo()
    assert read_state(part / LAST, "")["epoch"] == 1
    train(quick(small_d7p, part, epochs=2, resume_from_checkpoint="latest"))
    a = read_state(full / LAST, "")
    b = read_state(part / LAST, "")
    assert b["epoch"] == 2 and len(b["history"]) == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    with pytest.raises(InputError, match=r"--model: 'vit' differs from 'resnet18'"):
        train(
            quick(
                small_d7p, part, model="vit", vit_name="vit_tiny_patch16_224", epochs=3, resume_from_checkpoint="latest"
            )
        )


def test_folds_never_share_a_lesion(ham_csv, tmp_path, small_d7p):
    # HAM10000 photographs many lesions several times: the grouping is tested where it matters
    records = load_metadata("ham10000", ham_csv, skip_bad_rows=False).records
    frame = pd.DataFrame({"label": [r.dx for r in records], "lesion_id": [r.lesion_id for r in records]})
    pairs = lesion_folds(frame, 5, seed=0)
    held_lesions = [set(held["lesion_id"]) for _, held in pairs]
    assert sum(len(held) for _, held in pairs) == len(frame)
    for i, (fit_rows, _) in enumerate(pairs):
        assert not set(fit_rows["lesion_id"]) & held_lesions[i]
        for j in range(i):
            assert not held_lesions[i] & held_lesions[j]
    # and the --folds run writes one model per fold plus the cross-validation summary
    report = train(quick(small_d7p, tmp_path / "cv", folds=2))
    assert [Path(r["output_dir"]).name for r in report["runs"]] == ["fold-0", "fold-1"]
    assert (tmp_path / "cv" / "fold-1" / BEST).is_file()
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text())["cv_balanced_accuracy"]["mean"] >= 0


def test_compare_real_synthetic_mixed(tmp_path, small_d7p, fake_generation):
    out = tmp_path / "cmp"
    args = ["--data_dir", str(small_d7p), "--synthetic_dir", str(fake_generation), "--output_dir", str(out)]
    args += [
        "--pretrained",
        "false",
        "--image_size",
        "32",
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--num_workers",
        "0",
        "--synthetic_ratio",
        "0.5",
    ]
    assert compare_main(args) == 0
    table = pd.read_csv(out / "compare.csv")
    n_real = len(read_image_table(small_d7p, "train"))
    assert table["train"].tolist() == ["real", "synthetic", "mixed"]
    assert table["n_real"].tolist() == [n_real, 0, n_real]
    assert table["n_synthetic"].tolist() == [0, round(0.5 * n_real), round(0.5 * n_real)]
    assert table["balanced_accuracy"].between(0, 1).all() and table["seeds"].eq(1).all()
    text = (out / "compare.md").read_text()
    assert "| mixed |" in text and "| majority class (" in text and "`validation`" in text
    # each training set against real only: the difference of the scored runs, its interval and a verdict from it
    diffs = json.loads((out / "comparison.json").read_text())["differences"]
    ba = {d["name"]: d for d in diffs if d["metric"] == "balanced_accuracy"}
    assert set(ba) == {"synthetic only", "real + synthetic"}
    by_train = dict(zip(table["train"], table["balanced_accuracy"], strict=True))
    mixed = ba["real + synthetic"]
    assert mixed["against"] == "real only" and mixed["n_images"] == len(read_image_table(small_d7p, "validation"))
    assert mixed["difference"] == pytest.approx(by_train["mixed"] - by_train["real"], abs=1e-5)
    assert mixed["low"] <= mixed["difference"] <= mixed["high"]
    expected = "better" if mixed["low"] > 0 else "worse" if mixed["high"] < 0 else "no difference shown"
    assert mixed["verdict"] == expected
    assert {"worst_group_accuracy", "worst_sex"} <= {d["metric"] for d in diffs}
    assert "paired bootstrap 95% interval" in text and "| real + synthetic | real only | balanced acc. |" in text
    assert len(pd.read_csv(out / "compare_differences.csv")) == len(diffs)


def test_compare_checks_every_run_before_the_first_trains(tmp_path, small_d7p, fake_generation, capsys):
    """Issue 15: a synthetic set that cannot be used stopped compare.py only after the real-only run had trained."""
    synthetic = tmp_path / "synthetic"
    shutil.copytree(fake_generation, synthetic)
    for png in synthetic.rglob("*.png"):
        png.write_bytes(b"not a png")
    out = tmp_path / "cmp"
    args = ["--data_dir", str(small_d7p), "--synthetic_dir", str(synthetic), "--output_dir", str(out)]
    assert (
        compare_main(args + ["--pretrained", "false", "--image_size", "32", "--epochs", "1", "--num_workers", "0"]) == 2
    )
    assert "error: synthetic: no readable images left" in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_and_missing_images(tmp_path, small_d7p):
    data = subset(small_d7p, tmp_path / "data", {"train": 6, "validation": 3})
    victim = next((data / "train" / "images").rglob("*.*"))
    victim.unlink()
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = train(quick(data, tmp_path / "run", amp=True))  # bfloat16 autocast on CPU
    assert report["skipped"]["train_corrupt_image"] == 1
    assert np.isfinite(report["runs"][0]["history"][0]["train_loss"])
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["skipped"]["train_corrupt_image"] == 1
    victim.unlink()
    with pytest.raises(InputError, match="listed image.*not found"):
        train(quick(data, tmp_path / "run2"))
    assert train(quick(data, tmp_path / "run3", skip_missing=True))["skipped"]["train_missing_image"] == 1


def test_an_oversized_image_is_a_counted_skip(tmp_path, small_d7p, capsys):
    data = subset(small_d7p, tmp_path / "data", {"train": 6, "validation": 3})
    victim = next((data / "train" / "images").rglob("*.*"))
    victim.unlink()
    oversized_png(victim)  # 10 kB on disk, 90 M pixels (270 MB as RGB) decoded
    skipped: dict[str, int] = {}
    frame = read_image_table(data, "train")
    assert len(drop_corrupt({"train": frame}, skipped)["train"]) == len(frame) - 1
    assert skipped == {"train_corrupt_image": 1} and "exceeds the limit" in capsys.readouterr().err


def test_class_absent_from_training(tmp_path, small_d7p):
    data = subset(small_d7p, tmp_path / "data", {"train": 6, "validation": 3})
    rows = [json.loads(x) for x in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    (data / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "df"))
    with pytest.raises(InputError, match=r"no training images of class\(es\) df \(3 validation images\)"):
        train(quick(data, tmp_path / "run"))
    frame = read_image_table(data, "validation")
    assert check_classes(frame[frame["label"] != "df"], frame, allow_missing=True) == ["df"]


def test_checkpoint_for_other_classes(tmp_path, small_d7p, capsys):
    ckpt = tmp_path / "three.safetensors"
    write_state(ckpt, {"format": FORMAT, "model": {}, "config": {"model": "resnet18"}, "classes": ["mel", "nv", "bcc"]})
    with pytest.raises(InputError, match="was trained for 3 classes"):
        load_classifier(ckpt)
    assert eval_main(["--checkpoint", str(ckpt), "--data_dir", str(small_d7p)]) == 2
    assert "was trained for 3 classes (mel, nv, bcc), this version scores 7" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="is not a readable checkpoint"):
        load_classifier(tmp_path / "junk.safetensors")


def test_a_pickled_checkpoint_is_refused_unread(tmp_path, small_d7p, capsys):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "run" / "last.pt"
    crafted.parent.mkdir()
    torch.save({"model": RunsCode(marker), "config": {}, "classes": list(labels.CODES)}, crafted)
    assert eval_main(["--checkpoint", str(crafted), "--data_dir", str(small_d7p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "last.pt: is a pickled checkpoint" in err
    assert f"python -m lesiongen.classify.convert_checkpoint --checkpoint {crafted}" in err
    # an earlier version's run folder is neither unpickled nor silently started over
    with pytest.raises(InputError, match="last.pt: is a pickled checkpoint.*--resume_from_checkpoint none"):
        train(quick(small_d7p, crafted.parent, resume_from_checkpoint="latest"))
    # and the converter, without --trust, reads it with the weights-only loader, which refuses it
    assert convert_main(["--checkpoint", str(crafted)]) == 2
    assert "rerun with --trust" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run" / "last.safetensors").exists()


def test_an_old_checkpoint_converts_and_scores_the_same(tmp_path, small_d7p):
    cfg = quick(small_d7p, tmp_path / "run")
    model = torchvision.models.resnet18(num_classes=len(labels.CODES))  # what earlier versions trained
    old = tmp_path / "run" / "best.pt"
    old.parent.mkdir()
    # the dict earlier versions saved with torch.save
    state = {"model": model.state_dict(), "classes": list(labels.CODES), "config": asdict(cfg), "epoch": 3}
    torch.save({**state, "metrics": {"balanced_accuracy": 0.5}}, old)
    assert convert_main(["--checkpoint", str(old)]) == 0
    loaded, loaded_cfg, ckpt = load_classifier(tmp_path / "run")  # the folder now means best.safetensors
    assert ckpt["epoch"] == 3 and loaded_cfg.image_size == cfg.image_size
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert convert_main(["--checkpoint", str(old)]) == 2  # never overwrites the converted file


def test_flag_errors(tmp_path, small_d7p, fake_generation, monkeypatch, capsys):
    with pytest.raises(InputError, match="--train synthetic needs synthetic images"):
        parse_config(ClassifyConfig, ["--data_dir", str(small_d7p), "--train", "synthetic"])
    assert classifier_main(["--data_dir", str(small_d7p), "--epochs", "0"]) == 2
    with pytest.raises(InputError, match="--num_workers: must be 0 or more, got -1"):  # was a DataLoader traceback
        quick(small_d7p, tmp_path / "w", num_workers=-1)
    with pytest.raises(InputError, match="--resume_from_checkpoint: .* is a folder, not a checkpoint file"):
        train(quick(small_d7p, tmp_path / "w", resume_from_checkpoint=str(tmp_path)))
    with pytest.raises(InputError, match="no train/metadata.jsonl"):
        train(quick(fake_generation, tmp_path / "x"))

    imagenet = timm.create_model("resnet18").state_dict()  # stands in for the ImageNet weights on the Hub
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", lambda *a, **k: dict(imagenet))
    cfg = quick(small_d7p, tmp_path / "pre", pretrained=True)
    model = build_model(cfg)
    assert torch.equal(model.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])  # the body starts from them
    assert model.fc.out_features == len(labels.CODES)  # the 1000-class head does not
    train(cfg)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", offline)
    capsys.readouterr()
    assert classifier_main(["--data_dir", str(small_d7p), "--output_dir", str(tmp_path / "pre2"), "--epochs", "1"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the data's skip notes, one line
    assert error.startswith("error: --pretrained: ImageNet weights for resnet18.tv_in1k could not be had")
    assert error.endswith(
        "pass --pretrained false to start from random weights, or run once online to fill the Hugging Face cache"
    )
    model, cfg, _ = load_classifier(tmp_path / "pre")  # offline again: the checkpoint alone suffices
    assert cfg.pretrained and model.fc.out_features == len(labels.CODES)


def test_a_perfect_reference_makes_no_difference_shown_say_it_is_the_ceiling():
    from lesiongen.classify.metrics import paired_differences

    truth = ["mel", "nv", "bcc"] * 40
    one_wrong = ["nv", *truth[1:]]
    keys = {"name": "real + synthetic", "against": "real only", "n_images": len(truth), "seeds": 1}
    at_ceiling = {**keys, "metric": "balanced_accuracy"}
    at_ceiling.update(paired_differences(truth, [one_wrong], [truth])["balanced_accuracy"])
    assert at_ceiling["verdict"] == "no difference shown" and at_ceiling["b"] == 1.0
    assert difference_text(at_ceiling).endswith(
        "no difference shown (real only is at 1.000, the ceiling: nothing can be shown better here)"
    )
    assert difference_table([at_ceiling])[1][0][-1].startswith("no difference shown (real only is at 1.000")
    below = {**keys, "metric": "balanced_accuracy"}
    below.update(paired_differences(truth, [truth], [one_wrong])["balanced_accuracy"])
    assert below["verdict"] == "no difference shown" and difference_text(below).endswith(", no difference shown")
    worse = {**keys, "metric": "balanced_accuracy"}
    worse.update(paired_differences(truth, [["nv"] * len(truth)], [truth])["balanced_accuracy"])
    assert difference_text(worse).endswith(", worse")  # below a perfect reference, "worse" is still a finding


def test_differences_pair_the_same_images_across_folders_and_orders(tmp_path):
    """The paper experiment scores each caption style's folder: the same real images under other paths."""
    truth = ["mel", "nv", "bcc", "nv"]
    runs = []
    for name, folder, pred, order in (
        ("real", "a", ["mel", "mel", "mel", "mel"], [0, 1, 2, 3]),
        ("mixed", "b", truth, [3, 1, 0, 2]),
    ):
        rows = [
            {"path": f"/{folder}/{i}.jpg", "image_id": f"img{i}", "label": truth[i], "sex": "male", "pred": pred[i]}
            for i in order
        ]
        (tmp_path / name).mkdir()
        pd.DataFrame(rows).to_csv(tmp_path / name / "predictions.csv", index=False)
        runs.append({"seed": 0, "eval_dir": str(tmp_path / name)})
    rows = differences([runs[1]], [runs[0]], 1, name="real + synthetic", against="real only")
    ba = next(r for r in rows if r["metric"] == "balanced_accuracy")
    assert (ba["a"], ba["b"], ba["difference"]) == (1.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert ba["name"] == "real + synthetic" and ba["n_images"] == 4
    (tmp_path / "mixed" / "predictions.csv").write_text("path,image_id,label,pred\n/b/9.jpg,img9,nv,nv\n")
    with pytest.raises(ValueError, match="scored on different images"):
        differences([runs[1]], [runs[0]], 1)


def test_a_run_resumes_on_its_synthetic_folder_however_spelled_or_linked(tmp_path):
    """The resume check compares folders, not strings: a link to the same set resumes, another set is refused."""
    from lesiongen.classify.train import same_setting

    (tmp_path / "set").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "set", target_is_directory=True)
    assert same_setting("synthetic_dir", str(tmp_path / "set"), str(tmp_path / "link"))
    assert same_setting("synthetic_dir", str(tmp_path / "set"), str(tmp_path / "set" / ".." / "set"))
    assert not same_setting("synthetic_dir", str(tmp_path / "set"), str(tmp_path / "other"))
    assert not same_setting("synthetic_dir", str(tmp_path / "set"), None)
    assert not same_setting("epochs", 3, 4)
