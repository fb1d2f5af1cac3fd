"""Split learning for a fleet: the trained model is kept (cloud checkpoints, edge and whole-model saves), steps
are applied exactly once across lost replies and cloud restarts (also a real SIGKILL), edges reconnect."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import edgelearn
from edgelearn import checkpoint as ckpt
from edgelearn import cli, collab, data
from edgelearn.collab.cloud import CHECKPOINT_NAME
from edgelearn.collab.protocol import ConnectionLost

PROCESS_TIMEOUT = 600  # generous: the suite also runs under qemu


@pytest.fixture(scope="module")
def digits():
    return data.get_dataset("digits")


def batches(ds, n, size=16):
    return [(ds.images[i * size:(i + 1) * size], ds.labels[i * size:(i + 1) * size]) for i in range(n)]


def fp32_edge(transport, ds, key="e1"):
    return collab.Edge(transport, ds.train.image_shape, 10, mode="fp32", precision="fp32", edge_key=key)


class FlakyTransport(collab.LocalTransport):
    """Loses the reply of the ``lose``-th exchange after the cloud handled it (the step is applied)."""

    def __init__(self, cloud, lose):
        super().__init__(cloud)
        self.count, self.lose = 0, lose

    def exchange(self, message):
        reply = super().exchange(message)
        self.count += 1
        if self.count == self.lose:
            raise ConnectionLost("reply lost")
        return reply


def test_a_step_whose_reply_was_lost_is_redone_by_the_edge_and_not_applied_twice(digits):
    ref_cloud = collab.Cloud("cnn", 4, seed=0)
    ref = fp32_edge(collab.LocalTransport(ref_cloud), digits)
    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = fp32_edge(FlakyTransport(cloud, lose=3), digits)  # exchange 1 is HELLO: step 2's reply is lost
    data_ = batches(digits.train, 4)
    for x, y in data_:
        ref.train_step(x, y)
    for x, y in data_:
        try:
            edge.train_step(x, y)
        except ConnectionLost:
            assert cloud.steps == 2 and edge.steps == 1
            assert edge.reconnect(collab.LocalTransport(cloud)) == 1
            edge.train_step(x, y)  # the cloud answers step 2 from its record
    assert cloud.steps == 4 and edge.steps == 4 and cloud.records["e1"].applied == 4
    for a, b in ((ref.model, edge.model), (ref_cloud.model, cloud.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_cloud_restarted_from_its_checkpoint_resumes_exactly(digits, tmp_path):
    """7 steps, checkpoint every 5, the cloud process 'dies' (its object is dropped), a new one resumes from the
    checkpoint: the edge rolls back to step 5 and redoes 6..10; the result equals an uninterrupted run bit for
    bit (fp32 wire, FP32 edge: nothing random)."""
    data_ = batches(digits.train, 10)
    ref_cloud = collab.Cloud("cnn", 4, seed=0)
    ref = fp32_edge(collab.LocalTransport(ref_cloud), digits)
    for x, y in data_:
        ref.train_step(x, y)

    cloud = collab.Cloud("cnn", 4, seed=0, checkpoint=str(tmp_path), checkpoint_every=5)
    edge = fp32_edge(collab.LocalTransport(cloud), digits)
    for x, y in data_[:7]:
        edge.train_step(x, y)
    _, meta = ckpt.read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == 5 and meta["extra"]["edges"]["e1"]["applied"] == 5
    del cloud

    restarted = collab.Cloud("cnn", 4, seed=0, checkpoint=str(tmp_path), resume=True)
    assert restarted.steps == 5
    assert edge.reconnect(collab.LocalTransport(restarted)) == 5
    while edge.steps < 10:
        edge.train_step(*data_[edge.steps])
    assert restarted.steps == 10 and restarted.records["e1"].applied == 10
    for a, b in ((ref.model, edge.model), (ref_cloud.model, restarted.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    # a cloud started with other settings refuses the checkpoint
    with pytest.raises(ValueError, match="split"):
        collab.Cloud("cnn", 3, seed=0, checkpoint=str(tmp_path), resume=True)


def test_out_of_order_step_and_reused_edge_key_are_refused(digits):
    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = fp32_edge(collab.LocalTransport(cloud), digits)
    (x, y), = batches(digits.train, 1)
    edge.train_step(x, y)
    edge.steps = 5  # pretend to be ahead
    with pytest.raises(collab.ProtocolError, match="expects step 2"):
        edge.train_step(x, y)
    with pytest.raises(collab.CollabError, match="already applied 1 steps"):
        fp32_edge(collab.LocalTransport(cloud), digits)  # a new edge run under the same key


def test_save_full_then_train_resume_evaluates_to_the_accuracy_join_reported(digits, tmp_path, capsys):
    """join (INT8 edge part, fp32 wire so the split evaluation is exactly the whole model's) --save-full, then
    `edgelearn train --resume` on that checkpoint evaluates to the same test accuracy; the edge part alone is
    saved too, and `video --model` loads the whole model."""
    cloud = collab.Cloud("cnn", 4, seed=0)
    with collab.CloudServer(cloud) as server:
        full, part = tmp_path / "full.safetensors", tmp_path / "edge.safetensors"
        rc = cli.main(["collab", "join", "--server", f"127.0.0.1:{server.port}", "--dataset", "digits",
                       "--mode", "fp32", "--steps", "30", "--batch-size", "32", "--no-progress",
                       "--save-full", str(full), "--save", str(part), "--json"])
        assert rc == 0
        joined = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert joined["test_accuracy"] > 0.3 and joined["full_model_test_accuracy"] == joined["test_accuracy"]
    rc = cli.main(["train", "--dataset", "digits", "--checkpoint", str(full), "--resume", "--epochs", "1",
                   "--no-progress", "--json"])
    assert rc == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["test_accuracy"] == joined["test_accuracy"] and trained["resumed_from_epoch"] == 1
    assert trained["precision"] == "int8" and trained["model"] == "cnn"
    state, meta = ckpt.read_checkpoint(part)
    assert meta["step"] == 30 and meta["extra"]["config"]["part"] == "edge" and meta["optimizer"] is not None
    from edgelearn.video.pipeline import load_video_model

    model = load_video_model(str(full))
    assert model(edgelearn.tensor(digits.test.images[:2])).shape == (2, 10)
    # and `edgelearn export` writes it as ONNX that ONNX Runtime runs like edgelearn (LAC folded, FP32)
    pytest.importorskip("onnxruntime", reason="needs the onnx extra (part of the test extra)")
    rc = cli.main(["export", str(full), str(tmp_path / "model.onnx"), "--check", "--json"])
    assert rc == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["input_shape"] == [1, 1, 8, 8] and exported["relative_l2_vs_edgelearn"] < 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what, proc=None):
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not predicate():
        assert proc is None or proc.poll() is None, f"{what}: the process ended: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_cloud_killed_with_sigkill_and_restarted_with_resume_the_edge_completes(digits, tmp_path):
    env = dict(os.environ, EDGELEARN_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    cli_ = [sys.executable, "-m", "edgelearn", "collab"]
    serve = cli_ + ["serve", "--port", str(port), "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "5",
                    "--edges", "1", "--timeout", str(PROCESS_TIMEOUT), "--resume", "--json"]
    steps = 40
    edge_log = tmp_path / "edge.log"
    procs = []
    try:
        cloud = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(cloud)
        with open(edge_log, "w") as log:
            edge = subprocess.Popen(cli_ + ["join", "--server", f"127.0.0.1:{port}", "--dataset", "digits",
                                            "--steps", str(steps), "--batch-size", "16", "--log-every", "1",
                                            "--retries", "60", "--retry-initial", "0.2", "--retry-max", "1",
                                            "--no-progress", "--json", "--connect-timeout", "120"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(edge)
        # kill the cloud once it has written a checkpoint and applied a few steps past it
        wait_for(lambda: "step 13/" in edge_log.read_text(), "step 13", edge)
        cloud.send_signal(signal.SIGKILL)
        cloud.wait(60)
        _, meta = ckpt.read_checkpoint(tmp_path / "ck" / CHECKPOINT_NAME)
        at_kill = meta["step"]
        assert at_kill >= 10 and at_kill % 5 == 0
        restarted = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(restarted)
        assert edge.wait(PROCESS_TIMEOUT) == 0, edge_log.read_text()
        out, err = restarted.communicate(timeout=PROCESS_TIMEOUT)
        assert restarted.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(60)
    text = edge_log.read_text()
    result = json.loads(text.strip().splitlines()[-1])
    resumed_at = meta["step"]  # the checkpoint the restarted cloud read (written before the kill)
    # the edge went back to the checkpoint's step (or one before it: the cloud applied that step and wrote the
    # checkpoint, the reply never arrived, and the cloud answers it again without applying it twice)
    assert f"the cloud holds {resumed_at} steps of this edge" in text, text
    assert result["steps"] == steps and result["reconnections"] >= 1
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == steps and f"resumed from" in out  # no step applied twice, none lost
    _, final = ckpt.read_checkpoint(tmp_path / "ck" / CHECKPOINT_NAME)
    assert final["step"] == steps and [e["applied"] for e in final["extra"]["edges"].values()] == [steps]
    # an uninterrupted run with the same settings, in-process
    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = collab.Edge(collab.LocalTransport(cloud), digits.train.image_shape, 10, precision="int8")
    ref = collab.train_edge(edge, digits.train, digits.test, steps=steps, batch_size=16, progress=False)
    print(f"SIGKILL at cloud step >= {at_kill}: resumed {result['test_accuracy']:.4f}, "
          f"uninterrupted {ref['test_accuracy']:.4f}")
    assert abs(result["test_accuracy"] - ref["test_accuracy"]) <= 0.05


def test_split_at_a_named_module_inside_a_nested_chain():
    from collections import OrderedDict

    from edgelearn import nn
    from edgelearn.collab.split import split_points

    features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    model = nn.Sequential(OrderedDict(features=features, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                      classifier=nn.Linear(8, 3)))
    assert split_points(model)[:4] == ["features.1", "features.2", "features.3", "pool"]
    edge, cloud = collab.split_model(model, "features.2")
    assert len(edge) == 2 and edge[0] is features[0] and cloud[0] is features[2] and cloud[-1] is model[3]
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    assert np.array_equal(cloud(edge(edgelearn.tensor(x))).data, model(edgelearn.tensor(x)).data)
    assert [len(p) for p in collab.split_model(model, "pool")] == [1, 3]  # the whole features, then the rest
    with pytest.raises(ValueError, match="no module named 'features.9'.*features.1"):
        collab.split_model(model, "features.9")
    with pytest.raises(ValueError, match="first layer"):
        collab.split_model(model, "features.0")
    with pytest.raises(ValueError, match="neither"):
        collab.split_model(model, "features..2")


def test_onnx_imported_model_split_at_a_node_and_trained_over_grpc(digits, tmp_path):
    """An ONNX file (here: the reference cnn exported) imported by edgelearn.onnx, cut at a node name; the
    edge verifies the cloud's announced architecture against its own copy of the file."""
    pytest.importorskip("onnx", reason="needs the onnx extra (part of the test extra)")
    from edgelearn import models, onnx as elonnx
    from edgelearn.collab.split import split_points

    edgelearn.manual_seed(3)
    path = tmp_path / "cnn.onnx"
    elonnx.export(models.cnn(1, 10, (8, 8)), str(path), (1, 1, 8, 8))
    graph = elonnx.load(str(path))
    assert "MaxPool_10" in split_points(graph) and "Conv_13" in split_points(graph)
    with pytest.raises(ValueError, match="no node named"):
        collab.split_model(graph, "Nope_1")
    cloud = collab.Cloud(f"onnx:{path}", "Conv_13", seed=0)
    with collab.CloudServer(cloud) as server:
        transport = collab.GrpcTransport(f"127.0.0.1:{server.port}", connect_timeout=60)
        edge = collab.Edge(transport, digits.train.image_shape, 10, mode="sgq", bits=4, precision="int8",
                           model=f"onnx:{path}")
        assert edge.feature_shape == (16, 4, 4)  # the first block's pooled output
        r = collab.train_edge(edge, digits.train, digits.test, steps=12, batch_size=32, progress=False)
    assert r["steps"] == 12 and cloud.steps == 12 and r["test_accuracy"] > 0.3  # chance 0.1
    # a different file on the edge (other weights, same layout) has the same digest; another layout is refused
    other = tmp_path / "mlp.onnx"
    elonnx.export(models.cnn(1, 10, (8, 8), channels=(8, 32, 64)), str(other), (1, 1, 8, 8))
    cloud2 = collab.Cloud(f"onnx:{path}", "Conv_13", seed=0)
    with pytest.raises(collab.ArchitectureMismatch, match="architecture digest"):
        collab.Edge(collab.LocalTransport(cloud2), digits.train.image_shape, 10, model=f"onnx:{other}")


def test_zoo_resnet20_split_at_a_named_stage_and_trained_over_loopback_grpc(digits):
    """resnet20 (torchvision layout) cut before ``layer2``; INT8 edge part; SGQ 4-bit over gRPC."""
    from edgelearn.collab.split import split_points

    cloud = collab.Cloud("resnet20", "layer2", seed=0)
    with collab.CloudServer(cloud) as server:
        transport = collab.GrpcTransport(f"127.0.0.1:{server.port}", connect_timeout=60)
        edge = collab.Edge(transport, digits.train.image_shape, 10, mode="sgq", bits=4, precision="int8",
                           model="resnet20", split="layer2")
        assert edge.feature_shape == (16, 8, 8)  # layer1's output on 8x8 digits
        r = collab.train_edge(edge, digits.train, digits.test, steps=8, batch_size=32, eval_limit=128,
                              bn_recalibration_batches=2, progress=False)
    assert r["steps"] == 8 and cloud.steps == 8 and r["model"] == "resnet20" and r["split"] == "layer2"
    assert r["test_accuracy"] > 0.2 and r["compression_vs_fp32"] > 6  # chance is 0.1
    from edgelearn.models import build_model

    model = build_model("mobilenet_v2", (1, 8, 8), 10)
    assert "features.7" in split_points(model) and "layer3.1" in split_points(build_model("resnet20", (1, 8, 8), 10))
    edge_part, cloud_part = collab.split_model(model, "features.7")
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    model.eval()
    assert np.allclose(cloud_part(edge_part(edgelearn.tensor(x))).data, model(edgelearn.tensor(x)).data, atol=1e-6)
