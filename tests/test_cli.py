"""The command-line tool."""

import json
import subprocess
import sys

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


TRAIN_JSON_FIELDS = {"test_accuracy", "train_images_per_s", "epochs", "precision", "dataset", "peak_rss_mb"}


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_json_last_line_has_the_contract_fields():
    r = run_cli("train", "--epochs", "1", "--json")
    assert r.returncode == 0, r.stderr
    result = last_json_line(r.stdout)
    assert TRAIN_JSON_FIELDS <= set(result)
    assert result["dataset"] == "digits" and result["precision"] == "int8" and result["epochs"] == 1
    assert 0.5 < result["test_accuracy"] <= 1 and result["train_images_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert "test accuracy" in r.stdout


def test_train_fp32_mlp_checkpoint_and_resume(tmp_path):
    ckpt = str(tmp_path / "run.safetensors")
    args = ("train", "--model", "mlp", "--precision", "fp32", "--checkpoint", ckpt, "--json", "--no-progress")
    first = run_cli(*args, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    resumed = run_cli(*args, "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    result = last_json_line(resumed.stdout)
    assert result["resumed_from_epoch"] == 1 and result["epochs"] == 2 and result["precision"] == "fp32"
    assert "resumed from" in resumed.stdout


def test_train_missing_dataset_says_how_to_get_it(tmp_path):
    r = run_cli("train", "--dataset", f"idx:{tmp_path}", "--epochs", "1")
    assert r.returncode != 0 and "train-images-idx3-ubyte" in r.stderr and "Traceback" not in r.stderr


def test_train_rejects_unknown_dataset():
    r = run_cli("train", "--dataset", "imagenet")
    assert r.returncode == 2 and "unknown name" in r.stderr
