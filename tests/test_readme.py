"""Every shell command and Python snippet of README.md runs, extracted from the file itself (never copied here),
block by block in document order in one scratch directory: later blocks use what earlier ones wrote
(run.safetensors, digits.safetensors, clip.mp4, ...).

Commands that would take minutes (under qemu in CI) get small settings from SUBSTITUTIONS, each documented with
its reason and checked to still match the README, so the table cannot rot. The few commands that cannot run inside
a test are listed in NOT_RUN with the reason. Files a README command assumes the reader has (an image of a digit,
a folder of them, an IDX copy of a dataset, a video clip before the video section makes one) are written first.

`edgelearn ARGS` runs as ``edgelearn.cli.main(ARGS)`` in this process (the function the console script calls),
so no interpreter starts per command (that costs seconds under qemu); a command the README sends to the
background (`&`, the collab cloud) runs as a process of this interpreter, and `wait` waits for it.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", TEXT, re.S | re.M)]
RUN = [(i, lang, code) for i, (lang, code) in enumerate(BLOCKS) if lang in ("sh", "python")]

# command (without its comment), or its start -> why it is not run here
NOT_RUN = {
    "pip install .": "installs the package under test (already installed; .ci/run installs it the README's way)",
    'pip install ".[test]"': "installs the test extra (already installed: this test runs from it)",
    "python -m pytest -q": "is the test suite running this test (.ci/run runs this very line)",
    'pip install ".[video]"': "installs PyAV, which the test extra already has",
    "bash scripts/build-wheels.sh": "cross-builds release wheels (minutes, Debian cross toolchain + zig); "
                                    ".ci/run's scripts/test-aarch64.sh builds and tests the aarch64 wheel",
    "python3 -m venv ~/el": "sets up a board's virtualenv",
    ". ~/el/bin/activate": "sets up a board's virtualenv",
    "pip install edgelearn-*_aarch64.whl": "installs the wheel on a board",
    "flower-superlink ": "starts Flower's SuperLink daemon on a server machine; tests/test_flower.py runs a local "
                         "deployment (SuperLink + 3 SuperNodes) of the same app",
    "flower-supernode ": "starts a Flower SuperNode daemon on an edge device (see tests/test_flower.py)",
    "printf ": "writes the user's ~/.flwr/config.toml",
    "flwr run ": "starts a run on a remote SuperLink (see tests/test_flower.py)",
}

# (regex on one command, replacement, why); {work}, {port}, {python} are filled in
SUBSTITUTIONS = [
    (r"^(edgelearn train\b.*)$", r"\1 --epochs 1", "1 epoch instead of 10 (or 3): seconds under qemu"),
    (r"--dataset fashion-mnist", "--dataset idx:{work}/fashion-small/",
     "the first 1,000 train / 500 test images of the real Fashion-MNIST files (written by this test)"),
    (r"idx:/data/mnist/", "idx:{work}/digits-idx/", "a small real dataset in IDX files (scikit-learn's digits)"),
    (r"^(edgelearn collab serve\b.*)$", r"\1 --port {port} --timeout 300",
     "a free port (instead of 50051, maybe taken), and a stuck cloud cannot hang the test"),
    (r"127\.0\.0\.1:50051", "127.0.0.1:{port}", "the same free port"),
    (r"^python ", "{python} ", "this interpreter"),
    (r"^(edgelearn collab join\b.*)$", r"\1 --steps 3 --eval-limit 64", "3 steps instead of an epoch"),
    (r"^(edgelearn demo-clip\b.*)$", r"\1 --frames 12", "12 frames instead of 60"),
    (r"^(edgelearn video) 0 ", r"\1 clip.mp4 ", "no camera in CI: the demo clip instead of camera 0"),
    (r"^(edgelearn finetune\b.*)$", r"\1 --epochs 1", "1 fine-tuning epoch instead of 5"),
]


def commands(code: str):
    """One README shell block as commands (comments stripped, `&&` chains split), keeping a trailing `&`."""
    for line in code.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command:
            background = command.endswith("&") and not command.endswith("&&")
            parts = [p.strip() for p in command.rstrip("&").strip().split("&&")]
            yield parts, background


def not_run(part: str) -> bool:
    return any(part == k or (k.endswith(" ") and part.startswith(k)) for k in NOT_RUN)


def prepare(part: str, values: dict, used: set = None) -> str:
    for k, (pattern, replacement, _) in enumerate(SUBSTITUTIONS):
        changed = re.sub(pattern, replacement.replace("{python}", shlex.quote(values["python"])).format(**values)
                         if "{" in replacement else replacement, part)
        if used is not None and changed != part:
            used.add(k)
        part = changed
    return part


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes())


def head_of_idx_gz(path: str, n: int, row: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        ndim = f.read(4)[3]
        dims = np.frombuffer(f.read(4 * ndim), ">u4")
        return np.frombuffer(f.read(n * row), np.uint8).reshape(n, *dims[1:])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image

    from edgelearn import data

    work = tmp_path_factory.mktemp("readme")
    # what the README's commands assume the reader has
    test = data.get_dataset("digits", seed=0).test
    Image.fromarray(np.rint(test.images[0, 0] * 255).astype(np.uint8)).save(work / "my_digit.png")
    for i in range(8):
        folder = work / "my_digits" / str(test.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(test.images[i, 0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    digits_train = data.get_dataset("digits", seed=0).train
    for c in range(5):  # the README's photos/ folder for `edgelearn finetune`: 12 images in each of 5 classes
        folder = work / "photos" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits_train.labels == c)[:12]:
            Image.fromarray(np.rint(digits_train.images[i, 0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    from edgelearn import video

    video.write_clip(work / "clip.mp4", video.synthetic_clip(12, 96, 128))  # as `edgelearn demo-clip clip.mp4`
    (work / "digits-idx").mkdir()
    for part, split in (("train", data.get_dataset("digits", seed=0).train), ("t10k", test)):
        write_idx(work / "digits-idx" / f"{part}-images-idx3-ubyte", np.rint(split.images[:, 0] * 255))
        write_idx(work / "digits-idx" / f"{part}-labels-idx1-ubyte", split.labels)
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        return work  # the Fashion-MNIST command is then skipped, visibly (see test_readme_block_runs)
    (work / "fashion-small").mkdir()
    for part, n in (("train", 1000), ("t10k", 500)):
        src = os.path.join(data.FASHION_MNIST_DIR, f"{part}-{{}}-idx{{}}-ubyte.gz")
        write_idx(work / "fashion-small" / f"{part}-images-idx3-ubyte", head_of_idx_gz(src.format("images", 3), n, 784))
        write_idx(work / "fashion-small" / f"{part}-labels-idx1-ubyte", head_of_idx_gz(src.format("labels", 1), n, 1))
    return work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_blocks_are_all_tagged_and_the_tables_match_it():
    assert {lang for lang, _ in BLOCKS} <= {"sh", "python", "text"}, "tag every README code block: sh, python or text"
    assert sum(lang == "sh" for _, lang, _ in RUN) >= 5 and sum(lang == "python" for _, lang, _ in RUN) >= 4
    run_parts = [p for _, lang, code in RUN if lang == "sh" for parts, _ in commands(code) for p in parts]
    for command in NOT_RUN:
        assert any(part == command or part.startswith(command) for part in run_parts), \
            f"NOT_RUN lists {command!r}, which the README no longer has"
    used = set()
    for part in run_parts:
        if not not_run(part):
            prepare(part, {"work": "W", "port": 1, "python": "PY"}, used)
    for k, (_, _, why) in enumerate(SUBSTITUTIONS):
        assert k in used, f"the substitution for {why!r} changes no README command"
    assert "pip install . && edgelearn train" in TEXT and 'pip install ".[test]" && python -m pytest -q' in TEXT


@pytest.mark.parametrize("index, lang, code", RUN, ids=[f"block{i}-{lang}" for i, lang, _ in RUN])
def test_readme_block_runs(index, lang, code, work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    if lang == "python":
        if re.search(r"^import onnxruntime\b", code, re.M) and not have_onnxruntime():
            pytest.skip(f"README block {index} uses ONNX Runtime, which is not importable here "
                        "(left out of the qemu runs; .ci/run's native run has it)")
        exec(compile(code, f"README.md[block {index}]", "exec"), {"__name__": "__readme__"})
        return
    from edgelearn import cli

    values = {"work": str(work), "port": free_port(), "python": sys.executable}
    background, missing = [], []
    try:
        for parts, in_background in commands(code):
            for part in (prepare(p, values) for p in parts if not not_run(p)):
                argv = shlex.split(part)
                if "fashion-small" in part and not (work / "fashion-small").is_dir():
                    missing.append(part)
                elif "--check" in argv and argv[:2] == ["edgelearn", "export"] and not have_onnxruntime():
                    missing.append(part)
                elif in_background:
                    assert argv[0] == "edgelearn", part
                    background.append((part, subprocess.Popen([sys.executable, "-m", *argv], cwd=work, text=True,
                                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
                elif argv == ["wait"]:
                    for command, proc in background:
                        out, err = proc.communicate(timeout=600)
                        assert proc.returncode == 0, f"README block {index}: `{command}` failed:\n{err[-3000:]}"
                    background.clear()
                elif argv[0] != "edgelearn":
                    r = subprocess.run(part, shell=True, cwd=work, capture_output=True, text=True, timeout=600)
                    assert r.returncode == 0, f"README block {index}: `{part}` failed:\n{r.stderr[-3000:]}"
                else:
                    rc = cli.main(argv[1:])
                    out = capsys.readouterr()
                    assert rc == 0, f"README block {index}: `{part}` exited {rc}:\n{out.err[-3000:]}"
                    if argv == ["edgelearn", "train", "--epochs", "1"]:  # the quick start shows the point
                        assert "INT8 vs FP32, same run: test accuracy" in out.out
    finally:
        for _, proc in background:
            proc.kill()
            proc.communicate()
    if missing:
        pytest.skip(f"the rest of README block {index} ran; not {missing}: they need dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist; .ci/run does) or ONNX Runtime (left out of the qemu "
                    "runs; .ci/run's native run has it)")


def have_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None
