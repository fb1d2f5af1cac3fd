"""The command-line tool."""

import json
import subprocess
import sys

import numpy as np
import pytest

import edgelearn


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgelearn", *args], capture_output=True, text=True, timeout=300, **kw)


def test_info_prints_backend():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    info = edgelearn.backend_info()
    assert info["kernel"] in r.stdout and "cpu_features" in r.stdout


def test_info_json_matches_backend_info():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == edgelearn.backend_info()


TRAIN_JSON_FIELDS = {"test_accuracy", "train_images_per_s", "train_step_images_per_s", "bn_recalibration_s", "epochs",
                     "precision", "dataset", "peak_rss_mb"}


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_json_last_line_has_the_contract_fields():
    r = run_cli("train", "--epochs", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = last_json_line(r.stdout)
    assert TRAIN_JSON_FIELDS <= set(result)
    assert result["dataset"] == "digits" and result["precision"] == "int8" and result["epochs"] == 1
    assert 0.5 < result["test_accuracy"] <= 1 and result["train_images_per_s"] > 0 and result["peak_rss_mb"] > 0
    # the default cnn has BatchNorm: its re-estimation is timed, and the steps alone run faster than the epoch
    assert result["bn_recalibration_s"] > 0
    assert result["train_step_images_per_s"] > result["train_images_per_s"]
    assert "test accuracy" in r.stdout


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: resume rules and the overwrite refusal (in process: the CLI is a face over the API)

FAST = ("--dataset", "digits", "--model", "mlp", "--precision", "fp32", "--no-progress", "--json")


def main_json(capsys, *args):
    from edgelearn import cli

    rc = cli.main(list(args))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return last_json_line(out.out), out.out


def main_error(capsys, *args):
    from edgelearn import cli

    rc = cli.main(list(args))
    out = capsys.readouterr()
    assert rc != 0 and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelearn: error: "), out.err
    return lines[0]


def interrupted_after_first_epoch(monkeypatch, capsys, ckpt, *args):
    """Runs ``train`` and stops it (as Ctrl-C would) right after the first epoch's checkpoint was written."""
    from edgelearn import checkpoint, cli

    real_save = checkpoint.save_checkpoint

    def save_then_stop(*a, **kw):
        real_save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    try:
        rc = cli.main(["train", *args, "--checkpoint", str(ckpt)])
    except KeyboardInterrupt:
        rc = 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    capsys.readouterr()
    assert rc != 0 and ckpt.exists()


def test_resume_continues_the_saved_run_with_its_saved_settings(tmp_path, monkeypatch, capsys):
    full, _ = main_json(capsys, "train", *FAST, "--epochs", "3", "--batch-size", "64", "--seed", "3")
    ckpt = tmp_path / "run.safetensors"
    interrupted_after_first_epoch(monkeypatch, capsys, ckpt, *FAST, "--epochs", "3", "--batch-size", "64",
                                  "--seed", "3")
    # none of --epochs/--batch-size/--seed repeated: the saved ones apply, and the curve is the uninterrupted one
    resumed, text = main_json(capsys, "train", "--checkpoint", str(ckpt), "--resume", "--no-progress", "--json")
    assert "resumed from" in text and "epoch 3/3" in text
    assert (resumed["resumed_from_epoch"], resumed["epochs"], resumed["batch_size"], resumed["seed"]) == (1, 3, 64, 3)
    assert (resumed["precision"], resumed["model"]) == ("fp32", "mlp")
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert resumed["test_accuracy"] == full["test_accuracy"]
    # repeating a saved value is fine; the free flags (threads, output) may change
    again, text = main_json(capsys, "train", "--checkpoint", str(ckpt), "--resume", "--epochs", "3", "--threads", "1",
                            "--no-progress", "--json")
    assert again["resumed_from_epoch"] == 3 and "nothing left to train" in text


@pytest.mark.parametrize("flag, value, saved", [
    ("--epochs", "30", "--epochs 3"), ("--batch-size", "32", "--batch-size 64"), ("--seed", "1", "--seed 3"),
    ("--precision", "int8", "--precision fp32"), ("--model", "cnn", "--model mlp"), ("--lr", "0.1", "--lr 0.02"),
])
def test_resume_refuses_a_flag_that_contradicts_the_saved_run(tmp_path, monkeypatch, capsys, flag, value, saved):
    ckpt = tmp_path / "run.safetensors"
    interrupted_after_first_epoch(monkeypatch, capsys, ckpt, *FAST, "--epochs", "3", "--batch-size", "64",
                                  "--seed", "3")
    before = ckpt.read_bytes()
    line = main_error(capsys, "train", "--checkpoint", str(ckpt), "--resume", flag, value)
    assert f"{flag} {value} conflicts with the run saved in {ckpt} ({saved})" in line
    assert ckpt.read_bytes() == before


def test_an_existing_checkpoint_is_never_overwritten_silently(tmp_path, capsys):
    ckpt = tmp_path / "run.safetensors"
    first, _ = main_json(capsys, "train", *FAST, "--epochs", "1", "--checkpoint", str(ckpt))
    before = ckpt.read_bytes()
    line = main_error(capsys, "train", *FAST, "--epochs", "1", "--checkpoint", str(ckpt))
    assert f"{ckpt} already exists: add --resume to continue that run, or --overwrite" in line
    assert ckpt.read_bytes() == before
    assert "give one of them" in main_error(capsys, "train", "--checkpoint", str(ckpt), "--resume", "--overwrite")
    assert "needs --checkpoint" in main_error(capsys, "train", "--resume")
    second, _ = main_json(capsys, "train", *FAST, "--epochs", "1", "--seed", "5", "--checkpoint", str(ckpt),
                          "--overwrite")
    assert second["resumed_from_epoch"] == 0 and ckpt.read_bytes() != before


# --------------------------------------------------------------------------------------------------------------
# predict, demo-clip, --version, --help


def write_idx(path, array):
    codes = {np.dtype("uint8"): 0x08, np.dtype("float32"): 0x0D}
    arr = np.ascontiguousarray(array)
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    path.write_bytes(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes())


def test_predict_on_a_checkpoint_gives_the_accuracy_train_printed(tmp_path, capsys):
    from edgelearn import data

    ckpt = tmp_path / "digits.safetensors"
    trained, text = main_json(capsys, "train", "--epochs", "2", "--compare", "none", "--checkpoint", str(ckpt),
                              "--no-progress", "--json")
    assert trained["precision"] == "int8" and trained["model"] == "cnn"
    test = data.get_dataset("digits", seed=0).test
    write_idx(tmp_path / "test-images", test.images[:, 0])            # float32 IDX: the exact test images
    write_idx(tmp_path / "test-labels", test.labels.astype(np.uint8))
    result, _ = main_json(capsys, "predict", str(ckpt), str(tmp_path / "test-images"), "--labels",
                          str(tmp_path / "test-labels"), "--json")
    assert result["n"] == len(test) and result["accuracy"] == trained["test_accuracy"]
    assert f"test accuracy: {100 * trained['test_accuracy']:.2f}%" in text
    row = result["predictions"][0]
    assert set(row) >= {"input", "class", "probability", "top", "label"} and len(row["top"]) == 3
    assert row["top"][0]["probability"] >= row["top"][1]["probability"] >= row["top"][2]["probability"]

    # image files and a folder of them (one subfolder per class: labels), as people have them
    from PIL import Image

    for i in range(6):
        label = str(test.labels[i])
        (tmp_path / "folder" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(test.images[i, 0] * 255).astype(np.uint8)).save(tmp_path / "folder" / label / f"{i}.png")
    from edgelearn import cli

    assert cli.main(["predict", str(ckpt), str(tmp_path / "folder" / label / f"{i}.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{i}.png") and "%" in out
    folder, _ = main_json(capsys, "predict", str(ckpt), str(tmp_path / "folder"), "--json")
    assert folder["n"] == 6 and 0 <= folder["accuracy"] <= 1
    assert {r["label"] for r in folder["predictions"]} <= set(trained_classes := [str(k) for k in range(10)])
    assert all(r["class"] in trained_classes for r in folder["predictions"])


def test_predict_refuses_images_of_another_shape(tmp_path, capsys):
    ckpt = tmp_path / "mlp.safetensors"
    main_json(capsys, "train", *FAST, "--epochs", "1", "--checkpoint", str(ckpt))
    write_idx(tmp_path / "imgs", np.zeros((2, 28, 28), np.uint8))
    line = main_error(capsys, "predict", str(ckpt), str(tmp_path / "imgs"))
    assert "(1, 28, 28)" in line and "(1, 8, 8)" in line


def test_demo_clip_writes_a_clip_video_reads(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is in the video and test extras")
    from edgelearn import cli

    path = tmp_path / "clip.mp4"
    assert cli.main(["demo-clip", str(path), "--frames", "5"]) == 0
    assert f"wrote {path}: 5 frames" in capsys.readouterr().out
    result, _ = main_json(capsys, "video", str(path), "--json", "--model", "fcn")
    assert result["frames"] == 5


def test_version_and_help_say_what_a_user_needs():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"edgelearn {edgelearn.__version__}")
    r = run_cli("--help")
    assert r.returncode == 0 and "public API" not in r.stdout and "predict" in r.stdout
    r = run_cli("train", "--help")
    for default in ("(default: cnn)", "(default: int8)", "(default: 10)", "(default: 32)"):
        assert default in " ".join(r.stdout.split()), default


def test_train_missing_dataset_says_how_to_get_it(tmp_path):
    r = run_cli("train", "--dataset", f"idx:{tmp_path}", "--epochs", "1")
    assert r.returncode != 0 and "train-images-idx3-ubyte" in r.stderr and "Traceback" not in r.stderr


def test_train_rejects_unknown_dataset():
    r = run_cli("train", "--dataset", "imagenet")
    assert r.returncode == 2 and "unknown name" in r.stderr


@pytest.mark.parametrize("no_lac", [False, True])
def test_train_no_lac_trains_without_compensation_layers(tmp_path, capsys, no_lac):
    """``--no-lac`` reaches the model: its checkpoint holds no Compensation parameters (and with LAC on, one
    (alpha, mu, beta) triple per INT8 layer)."""
    from safetensors.numpy import load_file

    ckpt = tmp_path / "run.safetensors"
    flags = ["--no-lac"] if no_lac else []
    result, _ = main_json(capsys, "train", "--dataset", "digits", "--model", "mlp", "--precision", "int8",
                          "--epochs", "1", "--no-progress", "--json", "--checkpoint", str(ckpt), *flags)
    assert result["lac"] is (not no_lac)
    comp = [k for k in load_file(str(ckpt)) if k.endswith((".alpha", ".mu", ".beta"))]
    assert (comp == []) is no_lac, comp


def test_train_subsets_are_stratified_and_reported(capsys):
    """``--train-subset`` / ``--test-subset`` train and score on the stated numbers of images (reported in the
    JSON as ``train_images`` / ``test_images``); without them the splits stay whole."""
    from edgelearn import data as eldata

    full = eldata.get_dataset("digits", seed=0)
    result, out = main_json(capsys, "train", "--dataset", "digits", "--model", "mlp", "--precision", "fp32",
                            "--epochs", "1", "--no-progress", "--json", "--train-subset", "300",
                            "--test-subset", "120")
    assert (result["train_images"], result["test_images"]) == (300, 120)
    assert "(120 images" in out
    assert round(result["test_accuracy"] * 120, 6) == int(round(result["test_accuracy"] * 120))
    result, _ = main_json(capsys, "train", "--dataset", "digits", "--model", "mlp", "--precision", "fp32",
                          "--epochs", "1", "--no-progress", "--json")
    assert (result["train_images"], result["test_images"]) == (len(full.train), len(full.test))
