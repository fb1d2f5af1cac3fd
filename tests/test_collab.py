"""Collaborative (split) learning: split equivalence, wire modes, the envelope protocol, and edge/cloud over
gRPC on loopback (token, TLS, size limits, corrupt and vanishing edges, two edge processes)."""

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import edgelearn
from edgelearn import collab, data, models, optim
from edgelearn.collab import protocol
from edgelearn.collab.protocol import GRPC_MESSAGE_LIMIT, TRAIN, pack
from edgelearn.functional import cross_entropy
import grpc  # a dependency of edgelearn (the transport)
from edgelearn.collab.transport import METHOD, CloudServer, GrpcTransport

# Generous but bounded: the suite also runs under qemu-aarch64 emulation on a loaded 2-core machine.
PROCESS_TIMEOUT = 420


@pytest.fixture(scope="module")
def digits():
    return data.get_dataset("digits", seed=0)


def synthetic(n=64, size=28, classes=10, seed=0):
    """Fashion-MNIST-shaped images (1x28x28): the 16x14x14 features the acceptance numbers are about."""
    rng = np.random.default_rng(seed)
    return data.ArrayDataset(rng.random((n, 1, size, size), dtype=np.float32), rng.integers(0, classes, n))


def state(*modules):
    out = {}
    for prefix, m in zip("ec", modules):
        out.update({f"{prefix}.{k}": v for k, v in m.state_dict().items()})
    return out


# --------------------------------------------------------------------------------------------------------------
# Splitting and the in-process code path


def test_split_model_shares_layers_and_validates_index():
    model = models.cnn(1, 10, 28)
    edge, cloud = collab.split_model(model, 4)
    assert len(edge) == 4 and len(cloud) == len(model) - 4
    assert edge[0] is model[0] and cloud[0] is model[4]
    for bad in (0, len(model), -1):
        with pytest.raises(ValueError, match="split"):
            collab.split_model(model, bad)
    with pytest.raises(TypeError):
        collab.split_model(model, 2.5)


def test_fp32_split_training_matches_unsplit_training(digits):
    x, y = digits.train.images[:32], digits.train.labels[:32]
    x2, y2 = digits.train.images[32:64], digits.train.labels[32:64]

    edgelearn.manual_seed(0)
    full = models.build_model("cnn", digits.train.image_shape, 10)
    opt = optim.SGD(list(full.parameters()), lr=0.02, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for bx, by in ((x, y), (x2, y2)):  # two steps, so momentum matters too
        loss = cross_entropy(full(edgelearn.tensor(bx)), by)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = collab.Edge(collab.LocalTransport(cloud), digits.train.image_shape, 10, mode="fp32", precision="fp32")
    r1 = edge.train_step(x, y)
    edge.train_step(x2, y2)
    assert r1["feature_rel_l2"] == 0.0
    reference = full.state_dict()
    split_state = list(edge.model.state_dict().values()) + list(cloud.model.state_dict().values())
    assert len(split_state) == len(reference)
    for (name, want), got in zip(reference.items(), split_state):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_split_batchnorm_recalibration_matches_the_training_loop(digits):
    from edgelearn.train import recalibrate_batchnorm

    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = collab.Edge(collab.LocalTransport(cloud), digits.train.image_shape, 10, mode="fp32", precision="fp32")
    for start in (0, 16, 32):
        edge.train_step(digits.train.images[start:start + 16], digits.train.labels[start:start + 16])
    trained = state(edge.model, cloud.model)
    assert edge.recalibrate_batchnorm(digits.train, batches=3, batch_size=16, seed=5) == 48
    split_result = state(edge.model, cloud.model)
    changed = [k for k in trained if "running" in k and not np.array_equal(trained[k], split_result[k])]
    assert changed, "recalibration changed no running statistics"

    full = edgelearn.nn.Sequential(*edge.model, *cloud.model)  # the same layers, unsplit
    edge.model.load_state_dict({k[2:]: v for k, v in trained.items() if k[0] == "e"})
    cloud.model.load_state_dict({k[2:]: v for k, v in trained.items() if k[0] == "c"})
    recalibrate_batchnorm(full, digits.train, batches=3, batch_size=16, seed=5)
    for k, v in state(edge.model, cloud.model).items():
        np.testing.assert_allclose(split_result[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_modes_order_traffic_and_sgq_4bit_is_7x_smaller_than_fp32():
    train = synthetic(64)
    summaries = {}
    for mode in collab.MODES:
        cloud = collab.Cloud("cnn", 4, seed=0)
        edge = collab.Edge(collab.LocalTransport(cloud), (1, 28, 28), 10, mode=mode, bits=4, precision="fp32")
        summaries[mode] = collab.train_edge(edge, train, None, epochs=1, batch_size=32, progress=False)
        assert cloud.ended[0]["status"] == "completed"
        # the cloud counted the same bytes as the edge
        assert cloud.ended[0]["bytes_up_per_sample"] == pytest.approx(summaries[mode]["bytes_up_per_sample"])
    per_sample = {m: s["bytes_per_sample"] for m, s in summaries.items()}
    assert per_sample["fp32"] > per_sample["fp16"] > per_sample["sgq"] > per_sample["uniform"]
    assert summaries["fp32"]["feature_shape"] == [16, 14, 14]
    assert per_sample["fp32"] / per_sample["sgq"] >= 7.0
    assert per_sample["fp32"] / per_sample["fp16"] == pytest.approx(2.0, rel=0.01)
    assert summaries["fp32"]["feature_rel_l2"] == 0.0
    assert 0 < summaries["sgq"]["feature_rel_l2"] < summaries["uniform"]["feature_rel_l2"]
    assert 0 < summaries["sgq"]["grad_rel_l2"] < summaries["uniform"]["grad_rel_l2"]


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_sgq_4bit_features_take_fewer_bytes_than_uniform_4bit_with_less_error_on_fashion_mnist():
    splits = data.get_dataset("fashion-mnist")
    train = data.ArrayDataset(splits.train.images[:1024], splits.train.labels[:1024], "fashion-mnist", 10)
    runs = {}
    for mode in ("uniform", "sgq"):
        cloud = collab.Cloud("cnn", 4, seed=0)
        edge = collab.Edge(collab.LocalTransport(cloud), train.image_shape, 10, mode=mode, bits=4, precision="fp32")
        runs[mode] = collab.train_edge(edge, train, None, steps=12, batch_size=64, progress=False,
                                       bn_recalibration_batches=0)
    # same envelopes and labels: the difference is the feature frames (constant background rows as one
    # code each pay for the per-frame ranges of 1-channel, 1-row blocks)
    assert runs["sgq"]["bytes_up_per_sample"] <= runs["uniform"]["bytes_up_per_sample"]
    assert runs["sgq"]["feature_rel_l2"] < runs["uniform"]["feature_rel_l2"] / 1.5


def test_clipping_reaches_both_codecs_and_cuts_the_2bit_gradient_error():
    train = synthetic(64)
    runs, edges = {}, {}
    for name, clip in (("plain", {}), ("clip", dict(feature_clip="sigma:2.5", grad_clip=("sigma", 1.5)))):
        cloud = collab.Cloud("cnn", 4, seed=0)
        edge = collab.Edge(collab.LocalTransport(cloud), (1, 28, 28), 10, mode="sgq", bits=2, group=4,
                           stripe_rows=7, precision="fp32", **clip)
        session = edge.transport.session
        runs[name] = collab.train_edge(edge, train, None, epochs=1, batch_size=32, progress=False, close=False,
                                       bn_recalibration_batches=0)
        edges[name] = (edge, session)
    edge, session = edges["clip"]
    assert edge.feature_codec._codec.clip == ("sigma", 2.5)
    assert session.grad_codec._codec.clip == ("sigma", 1.5)  # told in HELLO: the cloud clips what it sends
    assert session.settings["grad_clip"] == ("sigma", 1.5)
    assert edges["plain"][1].grad_codec._codec.clip is None
    assert runs["clip"]["grad_clip"] == ("sigma", 1.5) and runs["clip"]["feature_clip"] == ("sigma", 2.5)
    # same frame sizes (the envelopes' loss and error numbers may print a digit more or less); the heavy-tailed
    # gradients lose much less at 2 bits with their ranges clipped
    assert runs["clip"]["bytes_down_per_sample"] == pytest.approx(runs["plain"]["bytes_down_per_sample"], abs=1)
    assert runs["clip"]["grad_rel_l2"] < 0.8 * runs["plain"]["grad_rel_l2"]
    assert runs["clip"]["feature_rel_l2"] != runs["plain"]["feature_rel_l2"]


def test_bad_clip_settings_are_refused():
    with pytest.raises(ValueError, match="clip"):
        collab.Edge(collab.LocalTransport(collab.Cloud("cnn", 4)), (1, 28, 28), 10, mode="fp16", grad_clip="sigma")
    with pytest.raises(ValueError, match="clip"):
        collab.Edge(collab.LocalTransport(collab.Cloud("cnn", 4)), (1, 28, 28), 10, feature_clip="sigma:-2")
    hello = {"input_shape": [1, 28, 28], "classes": 10, "mode": "sgq", "bits": 2, "group": 4}
    for bad in (["sigma", "x"], ["trim", 2.0], ["minmax", 2.0], {"z": 1}, "sigma:0", ["sigma", 1.0, 2.0]):
        transport = collab.LocalTransport(collab.Cloud("cnn", 4))
        with pytest.raises(collab.ProtocolError, match="grad_clip"):
            transport.exchange(pack(protocol.HELLO, dict(hello, grad_clip=bad)))
    transport = collab.LocalTransport(collab.Cloud("cnn", 4))
    with pytest.raises(collab.ProtocolError, match="grad_clip"):
        transport.exchange(pack(protocol.HELLO, dict(hello, mode="uniform", grad_clip=["sigma", 2.0])))


def test_int8_edge_trains_through_sgq(digits):
    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = collab.Edge(collab.LocalTransport(cloud), digits.train.image_shape, 10, mode="sgq", bits=4,
                       precision="int8")
    assert any(isinstance(m, edgelearn.nn.Compensation) for m in edge.model.modules())
    before = state(edge.model)
    result = collab.train_edge(edge, digits.train, digits.test, epochs=1, batch_size=32, progress=False)
    assert result["steps"] == -(-len(digits.train) // 32)
    assert result["test_accuracy"] > 0.5  # chance is 0.1
    assert any(not np.array_equal(before[k], v) for k, v in state(edge.model).items())


def test_step_with_a_non_finite_loss_is_refused_and_leaves_the_cloud_untouched(digits):
    cloud = collab.Cloud("cnn", 4, seed=0)
    transport = collab.LocalTransport(cloud)
    edge = collab.Edge(transport, digits.train.image_shape, 10, mode="fp32", precision="fp32")
    edge.train_step(digits.train.images[:16], digits.train.labels[:16])
    before = cloud.state_dict()
    huge = np.full((16, *edge.feature_shape), 3e38, np.float32)  # finite, but overflows the cloud's forward
    message = pack(TRAIN, {"shape": list(huge.shape), "labels": "u1"},
                   [huge.tobytes(), digits.train.labels[:16].astype(np.uint8).tobytes()])
    with pytest.raises(collab.ProtocolError, match="step refused"):
        transport.exchange(message)
    after = cloud.state_dict()
    assert cloud.steps == 1 and all(np.array_equal(before[k], after[k]) for k in before)  # BN statistics too


def test_codec_rejects_bytes_that_do_not_match_the_message():
    x = np.abs(np.random.default_rng(0).standard_normal((2, 8, 4, 4), dtype=np.float32))
    for mode in collab.MODES:
        codec = collab.TensorCodec(mode, bits=4)
        blob = codec.encode(x)
        assert codec.decode(blob, x.shape).shape == x.shape
        with pytest.raises(ValueError):
            codec.decode(blob, (2, 8, 4, 5))
        with pytest.raises(ValueError):
            codec.decode(blob[:-3], x.shape)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(collab.ProtocolError, match="non-finite"):
        collab.TensorCodec("fp32").decode(bad.tobytes(), x.shape)
    with pytest.raises(collab.ProtocolError, match="mode"):
        collab.TensorCodec("sgq").decode(collab.TensorCodec("uniform").encode(x), x.shape)


def test_envelope_round_trip_and_rejects_malformed_bytes():
    message = pack(TRAIN, {"step": 3}, [b"abc", b""])
    assert protocol.unpack(message) == (TRAIN, {"step": 3}, [b"abc", b""])
    for bad, what in ((message[:5], "shorter"), (b"XXXX" + message[4:], "magic"), (message + b"x", "disagree"),
                      (message[:-1], "disagree"), (message[:4] + b"\x09" + message[5:], "version"),
                      (message[:5] + b"\x63" + message[6:], "kind")):
        with pytest.raises(collab.ProtocolError, match=what):
            protocol.unpack(bad)


def test_chunking_reassembles_and_enforces_the_size_limit():
    message = bytes(range(256)) * 10
    parts = list(protocol.chunks(message, chunk_bytes=1000))
    assert len(parts) == 3 and [p[0] for p in parts] == [0, 0, 1]
    assert sum(map(len, parts)) == protocol.wire_bytes(len(message), 1000)
    assert list(protocol.reassemble(parts)) == [message]
    with pytest.raises(collab.ProtocolError, match="limit of 2000 bytes"):
        list(protocol.reassemble(parts, max_message_bytes=2000))
    with pytest.raises(collab.ProtocolError, match="flag"):
        protocol.Reassembler().feed(b"\x07abc")


# --------------------------------------------------------------------------------------------------------------
# gRPC on loopback, in this process


@pytest.fixture
def serve():
    servers = []

    def start(token="tok", **kw):
        cloud = collab.Cloud("cnn", 4, seed=0)
        server = CloudServer(cloud, "127.0.0.1", 0, token=token, **kw).start()
        servers.append(server)
        return cloud, server

    yield start
    for server in servers:
        server.stop(0)


def join(server, digits, token="tok", mode="sgq", model=None, **kw):
    transport = GrpcTransport(f"127.0.0.1:{server.port}", token=token, connect_timeout=60, **kw)
    return collab.Edge(transport, digits.train.image_shape, 10, mode=mode, bits=4, precision="fp32", model=model)


def test_grpc_edge_trains_and_byte_counts_agree(serve, digits):
    cloud, server = serve()
    edge = join(server, digits)
    result = collab.train_edge(edge, digits.train, digits.test, steps=3, batch_size=32, eval_limit=64,
                               progress=False)
    assert result["steps"] == 3 and result["test_samples"] == 64
    assert cloud.wait_ended(1, timeout=60)
    ended = cloud.ended[0]
    assert ended["status"] == "completed" and ended["steps"] == 3
    assert (ended["bytes_up"], ended["bytes_down"]) == (result["bytes_up"], result["bytes_down"])


def test_wrong_token_is_refused(serve, digits):
    cloud, server = serve(token="right")
    for token in ("wrong", None):
        with pytest.raises(collab.AuthenticationError, match="refused this edge: wrong or missing token"):
            join(server, digits, token=token)
    assert cloud.steps == 0  # each refusal counts as a rejected session (--edges N counts them)
    assert [(e["status"], e["reason"]) for e in cloud.ended] == [("rejected", "wrong or missing token")] * 2
    edge = join(server, digits, token="right")  # the cloud still serves edges with the right token
    edge.train_step(digits.train.images[:8], digits.train.labels[:8])
    edge.close()
    assert cloud.steps == 1


def test_cli_join_with_wrong_token_fails_with_a_clear_message(serve, capsys):
    _, server = serve(token="right")
    from edgelearn import cli

    rc = cli.main(["collab", "join", "--server", f"127.0.0.1:{server.port}", "--token", "nope", "--steps", "1",
                   "--no-progress"])
    assert rc == 1
    assert "refused this edge: wrong or missing token" in capsys.readouterr().err


def self_signed_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_edge_that_does_not_fit_the_cloud_model_is_refused(serve, digits):
    cloud, server = serve()
    with pytest.raises(collab.ProtocolError, match="FAILED_PRECONDITION.*model 'mlp'"):
        join(server, digits, model="mlp")
    join(server, digits).close()  # fixes the architecture: 1x8x8 inputs
    transport = GrpcTransport(f"127.0.0.1:{server.port}", token="tok", connect_timeout=60)
    with pytest.raises(collab.ProtocolError, match=r"FAILED_PRECONDITION.*input \(1, 8, 8\)"):
        collab.Edge(transport, (1, 28, 28), 10, precision="fp32")
    assert cloud.wait_ended(3, timeout=60)
    assert [e["status"] for e in cloud.ended] == ["rejected", "completed", "rejected"]


def test_tls_with_a_self_signed_certificate(serve, digits, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    cloud, server = serve(tls_cert=str(cert), tls_key=str(key))
    assert server.tls
    edge = join(server, digits, root_cert=str(cert), server_name="localhost")
    edge.train_step(digits.train.images[:16], digits.train.labels[:16])
    edge.close()
    assert cloud.wait_ended(1, timeout=60) and cloud.ended[0]["status"] == "completed"
    with pytest.raises(collab.CollabError, match="cannot reach"):  # plaintext client, TLS server
        GrpcTransport(f"127.0.0.1:{server.port}", token="tok", connect_timeout=2)


def test_corrupt_frame_is_rejected_without_touching_the_cloud(serve, digits):
    cloud, server = serve()
    edge = join(server, digits)
    edge.train_step(digits.train.images[:16], digits.train.labels[:16])
    before = cloud.state_dict()
    x = edge.model(edgelearn.tensor(digits.train.images[:16])).data
    frame = bytearray(edge.feature_codec.encode(np.ascontiguousarray(x)))
    frame[len(frame) // 2] ^= 0x5A
    message = pack(TRAIN, {"shape": list(x.shape), "labels": "u1"},
                   [bytes(frame), digits.train.labels[:16].astype(np.uint8).tobytes()])
    with pytest.raises(collab.ProtocolError, match="INVALID_ARGUMENT.*CRC"):
        edge.transport.exchange(message)
    edge.transport.close()
    assert cloud.wait_ended(1, timeout=60)
    assert cloud.ended[0]["status"] == "rejected" and "CRC" in cloud.ended[0]["reason"]
    after = cloud.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    other = join(server, digits)  # the cloud keeps serving
    other.train_step(digits.train.images[:16], digits.train.labels[:16])
    other.close()
    assert cloud.steps == 2


def test_oversized_grpc_message_is_refused_and_large_envelopes_are_chunked(serve):
    cloud, server = serve(token=None)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = channel.stream_stream(METHOD)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"\x01" + bytes(GRPC_MESSAGE_LIMIT + 10)]), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    # an fp32 batch of 128 16x14x14 features is 1.6 MB: two chunks each way, trained normally
    train = synthetic(128)
    transport = GrpcTransport(f"127.0.0.1:{server.port}", connect_timeout=60)
    edge = collab.Edge(transport, (1, 28, 28), 10, mode="fp32", precision="fp32")
    result = edge.train_step(train.images, train.labels)
    assert result["n"] == 128
    edge.close()
    assert cloud.wait_ended(2, timeout=60)
    assert [e["status"] for e in cloud.ended] == ["dropped", "completed"]  # the refused call never said BYE


def test_message_above_the_cloud_limit_is_refused_with_a_clear_error(serve):
    cloud, server = serve(token=None, max_message_bytes=200_000)
    train = synthetic(32)
    edge = collab.Edge(GrpcTransport(f"127.0.0.1:{server.port}", connect_timeout=60), (1, 28, 28), 10,
                       mode="fp32", precision="fp32")
    with pytest.raises(collab.ProtocolError, match="exceeds the limit of 200000 bytes"):
        edge.train_step(train.images, train.labels)  # 32 x 12544 B of features
    edge.transport.close()
    assert cloud.steps == 0


def test_edge_vanishing_mid_message_is_dropped_and_its_partial_step_discarded(serve, digits):
    cloud, server = serve(token=None)
    edge = join(server, digits, token=None)
    edge.train_step(digits.train.images[:16], digits.train.labels[:16])
    before = cloud.state_dict()
    x = np.ascontiguousarray(edge.model(edgelearn.tensor(digits.train.images[:16])).data)
    message = pack(TRAIN, {"shape": list(x.shape), "labels": "u1"},
                   [edge.feature_codec.encode(x), digits.train.labels[:16].astype(np.uint8).tobytes()])
    edge.transport._requests.put(b"\x00" + message[:100])  # first chunk only, then the edge goes away
    edge.transport._channel.close()
    assert cloud.wait_ended(1, timeout=60)
    assert cloud.ended[0]["status"] == "dropped" and cloud.steps == 1
    after = cloud.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------------------
# Processes: one cloud, two edges, one of them killed


class LineReader:
    """Collects a process's stdout lines on a thread, so the test can wait for one without blocking forever."""

    def __init__(self, proc):
        self.lines = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout):
        with self._cond:
            ok = self._cond.wait_for(lambda: any(l is not None and predicate(l) for l in self.lines)
                                     or None in self.lines, timeout)
            return ok and any(l is not None and predicate(l) for l in self.lines)

    def text(self, timeout=PROCESS_TIMEOUT):
        self._thread.join(timeout)
        return "\n".join(l for l in self.lines if l is not None)


def test_one_cloud_two_edge_processes_one_killed(tmp_path):
    env = dict(os.environ, EDGELEARN_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port_file = tmp_path / "port"
    cli = [sys.executable, "-m", "edgelearn", "collab"]
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs = []
    try:
        cloud = subprocess.Popen(cli + ["serve", "--port", "0", "--port-file", str(port_file), "--edges", "2",
                                        "--token", "t0k", "--timeout", str(PROCESS_TIMEOUT), "--json"], **popen)
        procs.append(cloud)
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not port_file.exists():
            assert cloud.poll() is None, cloud.communicate()[1]
            assert time.monotonic() < deadline, "the cloud never reported its port"
            time.sleep(0.1)
        server = f"127.0.0.1:{port_file.read_text().strip()}"
        edge = cli + ["join", "--server", server, "--token", "t0k", "--precision", "fp32", "--batch-size", "16",
                      "--log-every", "1", "--no-progress"]
        doomed = subprocess.Popen(edge + ["--epochs", "1000", "--no-eval", "--name", "doomed"], **popen)
        procs.append(doomed)
        doomed_out = LineReader(doomed)
        assert doomed_out.wait_for(lambda l: l.startswith("step 3/"), PROCESS_TIMEOUT), doomed_out.text(1)
        survivor = subprocess.Popen(edge + ["--steps", "40", "--eval-limit", "96", "--json", "--name", "survivor"],
                                    **popen)
        procs.append(survivor)
        survivor_out = LineReader(survivor)
        # both edges train against the cloud at the same time, then one of them dies mid-training
        assert survivor_out.wait_for(lambda l: l.startswith("step 2/"), PROCESS_TIMEOUT), survivor_out.text(1)
        assert doomed.poll() is None, "the doomed edge ended on its own"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(PROCESS_TIMEOUT)

        assert survivor.wait(PROCESS_TIMEOUT) == 0, survivor.stderr.read()
        result = json.loads(survivor_out.text().splitlines()[-1])
        assert result["steps"] == 40 and result["mode"] == "sgq"
        assert result["test_samples"] == 96 and result["test_accuracy"] > 0.3  # chance is 0.1
        assert result["bytes_up_per_sample"] > 0 and result["bytes_down_per_sample"] > 0

        out, err = cloud.communicate(timeout=PROCESS_TIMEOUT)
        assert cloud.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        by_name = {s["name"].split(" ")[0]: s for s in summary["sessions"]}
        assert by_name["doomed"]["status"] == "dropped" and by_name["doomed"]["steps"] >= 3
        assert by_name["survivor"]["status"] == "completed" and by_name["survivor"]["steps"] == 40
        assert summary["steps"] == by_name["doomed"]["steps"] + 40
        assert "doomed (edge-1) dropped" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(60)


def test_serve_counts_refused_edges_towards_edges_and_in_its_summary(tmp_path, digits):
    port_file = tmp_path / "port"
    env = dict(os.environ, EDGELEARN_NUM_THREADS="1")
    cloud = subprocess.Popen([sys.executable, "-m", "edgelearn", "collab", "serve", "--port", "0", "--port-file",
                              str(port_file), "--edges", "2", "--token", "right", "--timeout", "120", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert cloud.poll() is None, cloud.communicate()[1]
            assert time.monotonic() < deadline, "the cloud never reported its port"
            time.sleep(0.1)
        for token in ("wrong", None):
            transport = GrpcTransport(f"127.0.0.1:{port_file.read_text().strip()}", token=token, connect_timeout=60)
            with pytest.raises(collab.AuthenticationError):
                collab.Edge(transport, digits.train.image_shape, 10, mode="fp32", precision="fp32")
        out, err = cloud.communicate(timeout=120)  # --edges 2: the two refusals end it
    finally:
        if cloud.poll() is None:
            cloud.kill()
    assert cloud.returncode == 0, err
    assert out.count("wrong or missing token") >= 2
    assert "0 edges completed, 0 dropped, 2 rejected" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["rejected"], summary["completed"], summary["timed_out"]) == (2, 0, False)
