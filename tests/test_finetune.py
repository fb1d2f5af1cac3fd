"""Your own images and your own model: ImageFolder, head replacement and --train selections, and the whole loop
ONNX in -> INT8 fine-tune on an image folder -> ONNX out -> ONNX Runtime predicts what edgelearn predicts."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

PIL = pytest.importorskip("PIL", reason='needs Pillow: pip install "edgelearn[images]"')
onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "edgelearn[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "edgelearn[onnx]"')

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

import edgelearn as el  # noqa: E402
from edgelearn import cli, data, models, nn  # noqa: E402
from edgelearn import onnx as elonnx  # noqa: E402
from edgelearn.checkpoint import load_model  # noqa: E402
from edgelearn.finetune import replace_head, select_trainable  # noqa: E402

CLASSES = ("bag", "boot", "coat", "dress", "shirt")


def class_image(c: int, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """A learnable pattern per class: a bright horizontal bar at a class-dependent row, plus noise."""
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    row = 1 + 2 * c
    img[row:row + 2, 1:size - 1] = 220
    return img


def write_folder(root, per_class=12, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(c, rng, size)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def small_onnx_cnn(path, classes=10, rng=np.random.default_rng(0)):
    """A pretrained-looking CNN as torch exports it (BatchNorm folded into the convs): conv-relu-pool, conv-relu,
    global pool, flatten, gemm."""
    def w(*s):
        return numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32))

    inits = [w(8, 1, 3, 3), w(8), w(16, 8, 3, 3), w(16), w(classes, 16), w(classes)]
    for t, n in zip(inits, ("features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                            "fc.weight", "fc.bias")):
        t.name = n
    nodes = [helper.make_node("Conv", ["input", "features.0.weight", "features.0.bias"], ["c1"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "features.3.weight", "features.3.bias"], ["c2"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 1, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))
    return path


# --- ImageFolder ---------------------------------------------------------------------------------------------


def test_image_folder_split_is_stratified_seeded_and_decodes_batches(folder):
    a = data.load_image_folder(folder, 12, channels=1, seed=3)
    b = data.load_image_folder(folder, 12, channels=1, seed=3)
    assert a.train.files == b.train.files and a.test.files == b.test.files
    assert len(a.train) + len(a.test) == 60 and not set(a.train.files) & set(a.test.files)
    assert np.bincount(a.test.labels).tolist() == [2] * 5 or np.bincount(a.test.labels).min() >= 2
    assert a.train.classes == CLASSES and a.train.image_shape == (1, 12, 12)
    x = a.test.load_batch([0, 1, 2])
    assert x.dtype == np.float32 and x.shape == (3, 1, 12, 12) and 0.0 <= x.min() and x.max() <= 1.0
    img = np.asarray(Image.open(a.test.files[0]), np.float32) / 255.0
    np.testing.assert_allclose(x[0, 0], img, atol=1e-6)  # same size: decoded exactly, no resampling


def test_image_folder_train_val_layout_resize_crop_flip_and_uint8_cache(tmp_path):
    write_folder(tmp_path / "train", per_class=4, size=20)
    write_folder(tmp_path / "val", per_class=2, size=20, seed=1)
    splits = data.get_dataset(f"folder:{tmp_path}", image_size=16, resize=18, channels=3, cache=True,
                              mean=0.5, std=0.25)
    train, val = splits
    assert (len(train), len(val)) == (20, 10) and train.train and not val.train
    x = train.load_batch(np.arange(8), np.random.default_rng(0))
    assert x.shape == (8, 3, 16, 16)
    assert all(c is None or c.dtype == np.uint8 for c in train.cache)  # the cache holds uint8, never float32
    y1, y2 = val.load_batch([0]), val.load_batch([0])
    np.testing.assert_array_equal(y1, y2)  # evaluation: center crop, no randomness
    assert abs(float(y1.mean())) < 4.0  # normalised with mean 0.5, std 0.25


def test_image_folder_counts_and_skips_bad_files(tmp_path):
    write_folder(tmp_path, per_class=3)
    (tmp_path / "bag" / "notes.txt").write_text("not an image")
    (tmp_path / "boot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\): 1 not images, 1 corrupt"):
        ds = data.ImageFolder(tmp_path, 12, channels=1)
    assert len(ds) == 15 and ds.skipped == 2
    os.unlink(ds.files[0])  # vanishes after the scan: replaced by another image of its class, counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = ds.load_batch(np.arange(len(ds)))
    assert batch.shape == (15, 1, 12, 12) and ds.decode_failures == 1
    assert any("cannot decode" in str(w.message) for w in caught)


# --- head and --train ------------------------------------------------------------------------------------------


def test_train_selections_pick_head_last_layers_and_normalisation():
    el.manual_seed(0)
    model = models.cnn(1, 10, 12)
    head = replace_head(model, 5)
    assert head.out_features == 5 and model[-1] is head
    el.octo(model)
    n = lambda ps: sum(p.data.size for p in ps)  # noqa: E731
    all_params = select_trainable(model, "all")
    head_params = select_trainable(model, "head")
    assert n(head_params) == 64 * 5 + 5 + 3 * 5  # Linear + its Compensation
    last1 = select_trainable(model, "last:1")
    conv3 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert conv3.weight.requires_grad and conv3.weight in last1 and n(last1) < n(all_params)
    first = [m for m in model.modules() if isinstance(m, nn.Conv2d)][0]
    assert not first.weight.requires_grad
    bn_head = select_trainable(model, "bn+head")
    assert first.bias.requires_grad and not first.weight.requires_grad
    assert all(p.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert n(head_params) < n(bn_head) < n(all_params)
    with pytest.raises(ValueError, match="last:K"):
        select_trainable(model, "some")


# --- the whole loop ----------------------------------------------------------------------------------------------


def test_onnx_in_int8_finetune_on_folder_onnx_out_matches_onnxruntime(tmp_path, folder, capsys):
    src = small_onnx_cnn(tmp_path / "pretrained.onnx")
    out, ck = tmp_path / "tuned.onnx", tmp_path / "tuned.safetensors"
    code = cli.main(["finetune", os.fspath(src), "--dataset", f"folder:{folder}", "--train", "last:1",
                     "--epochs", "3", "--batch-size", "8", "--lr", "0.05", "--json", "--no-progress",
                     "--checkpoint", os.fspath(ck), "--output", os.fspath(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_classes"] == 5 and report["precision"] == "int8" and report["model_kind"] == "onnx"
    assert report["trainable_parameters"] < report["total_parameters"] and report["onnx"] == os.fspath(out)
    assert report["image_shape"] == [1, 12, 12]

    # ONNX Runtime on the validation images vs edgelearn's model as the checkpoint holds it
    val = data.load_image_folder(folder, (12, 12), channels=1).test
    x = val.load_batch(np.arange(len(val)))
    sess = ort.InferenceSession(os.fspath(out), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"input": x})[0]
    model, _ = load_model(ck)
    assert any(getattr(m, "int8", None) is not None for m in model.modules())  # rebuilt as INT8
    ours = elonnx.fp32_outputs(model, x)
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) <= 1e-4
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    model.eval()
    with el.no_grad():
        int8_pred = model(el.tensor(x)).numpy().argmax(1)
    assert (int8_pred == theirs.argmax(1)).mean() >= 0.9  # INT8 eval quantizes activations: nearly always equal

    code = cli.main(["export", os.fspath(ck), os.fspath(tmp_path / "again.onnx"), "--check", "--json"])
    assert code == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["relative_l2_vs_edgelearn"] <= 1e-4 and exported["input_shape"] == [1, 1, 12, 12]


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_export_round_trip_of_built_in_models(tmp_path, name):
    el.manual_seed(1)
    model = models.build_model(name, (1, 12, 12), 5)
    el.octo(model)
    x = np.random.default_rng(2).standard_normal((6, 1, 12, 12)).astype(np.float32)
    model.train()
    opt = el.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # INT8 training moves the master weights, BN statistics and LAC parameters
        loss = el.functional.cross_entropy(model(el.tensor(x)), np.arange(6) % 5)
        opt.zero_grad()
        (loss + model.regularization()).backward()
        opt.step()
    proto = elonnx.export(model, tmp_path / "m.onnx", (1, 1, 12, 12))
    assert "Add" not in {n.op_type for n in proto.graph.node}  # the LAC shift is folded into the biases
    sess = ort.InferenceSession(os.fspath(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    ref = elonnx.fp32_outputs(model, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-4
    again = elonnx.load(tmp_path / "m.onnx")
    with el.no_grad():
        back = again(el.tensor(x)).numpy()
    assert np.linalg.norm(back - ref) / np.linalg.norm(ref) <= 1e-4
