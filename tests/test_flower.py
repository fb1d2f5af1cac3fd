"""edgelearn.flower: split learning over Flower's Message API. In process (the apps called directly: the same
accuracy and bytes as `edgelearn collab`), and as a real local deployment: one flower-superlink and three
flower-supernode processes on loopback, the app started with `flwr run`."""

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr", reason='needs Flower: pip install "edgelearn[flower]" (part of the test extra)')

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from edgelearn import collab, data  # noqa: E402
from edgelearn.flower import STYPE_FRAME, write_app  # noqa: E402
from edgelearn.flower import app as flower_app  # noqa: E402

PROCESS_TIMEOUT = 900  # generous: the suite also runs under qemu


class LocalGrid:
    """A Grid delivering each message to the ClientApp in this process, with one Context per node as a
    SuperNode keeps them (so the ClientApp sees exactly what it sees deployed, minus the network)."""

    def __init__(self, nodes):
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i,
                                                                              "num-partitions": nodes},
                                        state=RecordDict(), run_config={}) for i in range(nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            TaskIdentity.node_id = message.metadata.dst_node_id
            replies.append(flower_app.client_app(message, self.contexts[message.metadata.dst_node_id]))
        TaskIdentity.node_id = 0
        return replies


@pytest.mark.parametrize("clip", [{}, {"feature-clip": "sigma:2.5", "grad-clip": "sigma:1.5"}],
                         ids=["no-clip", "clip"])
def test_flower_apps_give_the_accuracy_and_bytes_of_collab(clip):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    settings = {"steps": 4, "batch-size": 32, "bits": 2, "eval-limit": 64, "bn-recalibration-batches": 2, **clip}
    flower = flower_app.run_split(LocalGrid(1), settings, log=lambda m: None)
    splits = data.get_dataset("digits")
    cloud = collab.Cloud("cnn", 4, seed=0)
    edge = collab.Edge(collab.LocalTransport(cloud), splits.train.image_shape, 10, bits=2, precision="int8",
                       **{k.replace("-", "_"): v for k, v in clip.items()})
    ref = collab.train_edge(edge, splits.train, splits.test, steps=4, batch_size=32, eval_limit=64,
                            bn_recalibration_batches=2, progress=False)
    node, = flower["nodes"]
    assert node["test_accuracy"] == ref["test_accuracy"] and node["test_samples"] == 64
    assert node["bytes_up_per_sample"] == ref["bytes_up_per_sample"]
    assert node["bytes_down_per_sample"] == ref["bytes_down_per_sample"]
    assert node["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)
    assert flower["stype"] == STYPE_FRAME and flower["frames"]["stypes"] == [STYPE_FRAME]
    assert flower["frames"]["count"] == 2 * 4  # features up and gradients down, one frame each per step
    assert flower["compression_vs_fp32"] > 6


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_bin(directory):
    """Flower's command-line tools as scripts running this interpreter (the SuperLink and SuperNodes start
    `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name from PATH)."""
    os.makedirs(directory, exist_ok=True)
    names = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-serverapp", "flwr-clientapp")
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        if ep.name in names:
            module, func = ep.value.split(":")
            path = os.path.join(directory, ep.name)
            with open(path, "w") as f:
                f.write(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
            os.chmod(path, 0o755)
    return directory


def test_flower_deployment_with_one_superlink_and_three_supernodes(tmp_path):
    link, *node_ports = free_ports(4)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), EDGELEARN_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=flower_bin(str(tmp_path / "bin")) + os.pathsep + os.environ.get("PATH", ""))
    result_file = tmp_path / "result.json"
    app = write_app(tmp_path / "app", steps=3, batch_size=32, eval_limit=128, bn_recalibration_batches=2,
                    min_nodes=3, wait_nodes_s=float(PROCESS_TIMEOUT), result_file=str(result_file))
    procs = []

    def start(args, log):
        proc = subprocess.Popen(args, stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own group: the SuperExec it starts dies with it
        procs.append(proc)
        return proc

    try:
        start(["flower-superlink", "--insecure", "--port", str(link), "--disable-runtime-dependency-installation"],
              "superlink.log")
        for i, port in enumerate(node_ports):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                   "--node-config", f"partition-id={i} num-partitions=3"], f"supernode{i}.log")
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:  # until the SuperLink (starting up, possibly slowly) accepts the run
            run = subprocess.run(["flwr", "run", app, "local", "--format", "json"], env=env, capture_output=True,
                                 text=True, timeout=PROCESS_TIMEOUT)
            try:
                started = json.loads(run.stdout).get("success") is True
            except ValueError:
                started = False
            if started:
                break
            assert all(p.poll() is None for p in procs), "a Flower process ended early"
            assert time.monotonic() < deadline, f"flwr run never started the app: {run.stdout} {run.stderr}"
            time.sleep(2)
        while not result_file.exists():
            assert all(p.poll() is None for p in procs), "a Flower process ended early"
            assert time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
    result = json.loads(result_file.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "nodes"}))
    for node in result["nodes"]:
        print(json.dumps(node))
    assert len(result["nodes"]) == 3 and sorted(n["partition"] for n in result["nodes"]) == [0, 1, 2]
    assert result["cloud_steps"] == 3 * 3
    assert result["stype"] == STYPE_FRAME and result["frames"]["stypes"] == [STYPE_FRAME]
    assert result["frames"]["count"] == 2 * 3 * 3
    fp32 = result["fp32_feature_bytes_per_sample"]
    for node in result["nodes"]:
        assert node["steps"] == 3 and node["test_samples"] == 128 and node["test_accuracy"] > 0.15  # chance 0.1
        # SGQ 4-bit frames on the wire: about an eighth of the float32 tensors they carry, each way
        assert 0 < node["frame_bytes_up_per_sample"] < fp32 / 4 and 0 < node["frame_bytes_down_per_sample"] < fp32 / 4
        # the envelope accounting of collab adds only headers, labels and chunk flags to the frames
        assert node["bytes_up_per_sample"] - node["frame_bytes_up_per_sample"] < 4
        assert node["bytes_down_per_sample"] - node["frame_bytes_down_per_sample"] < 8
