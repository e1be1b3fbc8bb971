"""Multi-node Ray on one machine: the jobs through the Jobs API, and what survives a failure.

A real cluster on this host, started as on VMs: ``ray start --head`` with no CPUs (it runs the
drivers and the dashboard) and two worker nodes, a "CPU node" (2 CPUs, resource ``cpu_node``)
and a "GPU node" (2 CPUs, 1 declared GPU, resource ``gpu_node``; jobs run with ``--device cpu``,
so nothing touches CUDA). Token authentication is on and the dashboard listens on 127.0.0.1.

Jobs go through :class:`JobSubmissionClient` (plain HTTP: this process never calls
``ray.init``, so it shares a pytest run with the local-Ray tests) with ``infra/runtime_env.yaml``
and the repository as working directory, as ``ray job submit --working-dir . --runtime-env
infra/runtime_env.yaml -- python jobs/...`` does. The model is a hand-set U-Net that marks dark
(hematoxylin) pixels as nucleus interior, so the runs find hundreds of nuclei and "the same
nuclei" is a real comparison.

Each node runs in a session this module starts; teardown kills the processes of those sessions
and their descendants, by id (never ``ray stop``, which would hit other Ray instances).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from wsi_pipeline.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from wsi_pipeline.models import create_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TIMEOUT = 240.0
ARGS = "--tile 256 --overlap 48 --batch-size 1 --device cpu"


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    state: str  # "Z": exited, not yet reaped
    cmd: str


def processes() -> list[Proc]:
    """Every process on this machine (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(Proc(int(entry.name), int(stat[1]), int(stat[3]), stat[0], cmd.strip()))
    return found


def family(sessions: set[int]) -> list[Proc]:
    """The processes of ``sessions`` and all their descendants (e.g. job drivers, which start
    sessions of their own under the head's job supervisor)."""
    procs = processes()
    members = {p.pid for p in procs if p.sid in sessions}
    grew = True
    while grew:
        more = {p.pid for p in procs if p.ppid in members and p.pid not in members}
        members |= more
        grew = bool(more)
    return [p for p in procs if p.pid in members]


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(procs: list[Proc]) -> None:
    """SIGKILL ``procs`` and wait until they are gone (SIGKILL is delivered asynchronously)."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(running(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_family(sessions: set[int]) -> list[Proc]:
    """Kill the processes of ``sessions`` and their descendants, until none is left running."""
    killed: list[Proc] = []
    for _ in range(5):  # a parent may have been forking while it was killed
        victims = [p for p in family(sessions) if running(p.pid)]
        if not victims:
            break
        kill(victims)
        killed += victims
    return killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the cluster ----------------------------------------------------------------------------


class NodeExited(RuntimeError):
    """A node's ``ray start`` exited."""


@dataclass
class Node:
    name: str
    args: list[str]
    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def session(self) -> int:
        assert self.process is not None
        return self.process.pid  # started with start_new_session: the session leader


@dataclass
class LoopbackCluster:
    """A head and worker nodes on this machine, each a ``ray start --block`` in its own session."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    launches: int = 0  # `ray start`s so far: each launch's node name is unique

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` is this venv's
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
        )
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        head = [
            "--head",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=0",
        ]
        self._join(Node("head", head, self.root / "head"))
        address = f"--address=127.0.0.1:{self.gcs_port}"
        cpu = [address, "--num-cpus=2", '--resources={"cpu_node": 1}']
        gpu = [address, "--num-cpus=2", "--num-gpus=1", '--resources={"gpu_node": 1}']
        # One at a time: two raylets registering at once on a loaded 2-core machine can keep
        # the GCS busy past `ray start`'s fixed 30 s wait for its node (seen in CI).
        self._join(Node("cpu-node", cpu, self.root / "cpu-node"))
        self._join(Node("gpu-node", gpu, self.root / "gpu-node"))

    def _join(self, node: Node, attempts: int = 3) -> None:
        """Start ``node`` and wait until the GCS lists it alive; start it again, up to
        ``attempts`` times, if its ``ray start`` gives up (it does after 30 s without its node
        info, which a busy GCS can fail to give)."""
        for attempt in range(1, attempts + 1):
            name = f"{node.name}-{self.launches}"
            self._launch(node, name)
            try:
                self._wait_for(lambda name=name: name in self.alive_names(), node.name)
                return
            except NodeExited:
                assert node.process is not None
                if node.process.poll() is None or attempt == attempts:
                    raise  # another node exited, or this one kept giving up
                self.kill_node(node)  # what that try left behind, in its session

    def _launch(self, node: Node, name: str) -> None:
        # Its own temp dir per node, as on separate machines (and no socket-name races).
        node.root.mkdir(parents=True, exist_ok=True)
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        command = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",  # this launch's, so a dead earlier try never counts
            f"--temp-dir={node.root}",
            f"--object-store-memory={256 * 2**20}",
            "--disable-usage-stats",
            *node.args,
            *ports,
        ]
        log = open(node.root / "ray-start.log", "ab")  # noqa: SIM115 - lives with the node
        node.process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.launches += 1
        if node not in self.nodes:
            self.nodes.append(node)

    def _nodes(self) -> list[dict[str, Any]]:
        try:
            reply = requests.get(f"{self.url}/api/v0/nodes", headers=self.headers, timeout=5)
            return list(reply.json()["data"]["result"]["result"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return []

    def alive_nodes(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self._nodes())

    def alive_names(self) -> set[str]:
        return {n["node_name"] for n in self._nodes() if n["state"] == "ALIVE"}

    def _wait_for(self, condition: Any, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for node in self.nodes:
                assert node.process is not None
                if node.process.poll() is not None:
                    log = (node.root / "ray-start.log").read_text(errors="replace")[-2000:]
                    raise NodeExited(f"{node.name} exited while waiting for {what}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def ensure_workers(self) -> None:
        """Restart worker nodes an earlier test killed."""
        for node in self.nodes[1:]:
            assert node.process is not None
            if node.process.poll() is not None:
                self._join(node)
        self._wait_for(lambda: self.alive_nodes() == len(self.nodes), f"{len(self.nodes)} nodes")

    def kill_node(self, node: Node) -> list[Proc]:
        victims = kill_family({node.session})
        assert node.process is not None
        node.process.wait(timeout=30)
        return victims

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.process is not None:
                kill_family({node.session})
                node.process.wait(timeout=30)

    def sessions(self) -> set[int]:
        return {node.session for node in self.nodes}

    # --- jobs ---

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers=self.headers)

    def submit(self, entrypoint: str) -> str:
        runtime_env = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())
        return self.client().submit_job(
            entrypoint=entrypoint, runtime_env={**runtime_env, "working_dir": str(REPO)}
        )

    def status(self, job: str) -> str:
        return str(self.client().get_job_status(job).value)

    def wait(self, job: str, timeout: float = JOB_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.monotonic() > deadline:
                self.client().stop_job(job)
                raise TimeoutError(f"{job} still {status} after {timeout} s:\n{self.logs(job)}")
            time.sleep(0.5)
        return status

    def logs(self, job: str) -> str:
        return str(self.client().get_job_logs(job))


def wait_until(condition: Any, what: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    if not (BIN / "ray").exists():
        pytest.skip("the ray command is not installed next to this Python")
    pytest.importorskip("aiohttp", reason="the Jobs API needs ray[default]")
    # A short root: Unix socket paths under it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="wsi-ray-", dir="/tmp"))
    loopback = LoopbackCluster(root)
    try:
        loopback.start()
        yield loopback
    finally:
        loopback.stop()
        leftovers = [p for p in family(loopback.sessions()) if running(p.pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes left behind: {leftovers}"


# --- model, data, outputs -------------------------------------------------------------------


def darkness_unet() -> torch.nn.Module:
    """A 3-class U-Net whose only path is "darker than mid-grey → nucleus interior".

    The first conv averages the (normalised) RGB with a minus sign, identity convs carry that
    channel along the top skip to the head; the deeper levels are zero. Dark hematoxylin nuclei
    on pink stroma become interior, everything else background: deterministic, plausible nuclei.
    """
    model = create_model("unet", num_classes=3, base_channels=4)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("conv.weight", "up.weight", "up.bias")) or name.startswith("head."):
            tensor.zero_()
    state["inc.0.conv.weight"][0, :, 1, 1] = -1 / 3
    for name in ("inc.1.conv.weight", "ups.3.conv.0.conv.weight", "ups.3.conv.1.conv.weight"):
        state[name][0, 0, 1, 1] = 1.0
    state["head.weight"][1, 0] = 8.0  # interior
    state["head.weight"][0, 0] = -8.0  # background
    state["head.bias"][:] = torch.tensor([2.0, -2.0, -20.0])  # boundary never wins
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = ModelCard(architecture="unet", kwargs={"base_channels": 4}, mpp=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "darkness", darkness_unet(), card)


def segment(inputs: str, checkpoint: Path, out: Path) -> str:
    return f"python jobs/segment_slides.py {inputs} --checkpoint {checkpoint} --out {out} {ARGS}"


def nuclei(path: Path) -> list[str]:
    """A slide's nuclei as sorted geometry + measurements (feature ids are random UUIDs)."""
    with gzip.open(path, "rt") as f:
        features = json.load(f)["features"]
    return sorted(
        json.dumps([f["geometry"], f["properties"]["measurements"]], sort_keys=True)
        for f in features
    )


def summary_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv") as f:
        return {Path(row["slide"]).stem: row for row in csv.DictReader(f)}


@dataclass(frozen=True)
class Reference:
    out: Path
    job: str
    nuclei: list[str]


@pytest.fixture(scope="module")
def reference(
    cluster: LoopbackCluster, slide_path: Path, checkpoint: Path, tmp_path_factory
) -> Reference:
    """The undisturbed run of the segment job on the cluster."""
    out = tmp_path_factory.mktemp("undisturbed")
    job = cluster.submit(segment(str(slide_path), checkpoint, out))
    status = cluster.wait(job)
    assert status == "SUCCEEDED", cluster.logs(job)
    return Reference(out, job, nuclei(out / "synthetic.geojson.gz"))


# --- tests ----------------------------------------------------------------------------------


def test_segment_job_runs_on_the_cluster(cluster: LoopbackCluster, reference: Reference) -> None:
    nodes = requests.get(f"{cluster.url}/api/v0/nodes", headers=cluster.headers, timeout=10)
    resources = [n["resources_total"] for n in nodes.json()["data"]["result"]["result"]]
    assert sum(r.get("GPU", 0) for r in resources) == 1
    assert sum(r.get("cpu_node", 0) + r.get("gpu_node", 0) for r in resources) == 2
    # Token authentication is on: the Jobs API refuses a request without the token.
    assert requests.get(f"{cluster.url}/api/jobs/", timeout=10).status_code == 401

    rows = summary_rows(reference.out)
    assert rows["synthetic"]["status"] == "complete"
    summary = json.loads((reference.out / "synthetic.json").read_text())
    assert summary["nuclei"] == len(reference.nuclei) == int(rows["synthetic"]["nuclei"])
    assert len(reference.nuclei) > 100  # the comparisons below are not vacuous
    assert "1 complete, 0 skipped, 0 failed" in cluster.logs(reference.job)


def test_killed_driver_resubmitted_skips_finished_slides(
    cluster: LoopbackCluster, reference: Reference, slide_path: Path, checkpoint: Path, tmp_path
) -> None:
    cluster.ensure_workers()
    slides = tmp_path / "slides"
    slides.mkdir()
    # Four slides, so that the batch is still running once the first has finished: the
    # pipeline streams, and two small slides could both finish before the driver is killed.
    stems = ("s1", "s2", "s3", "s4")
    for stem in stems:
        shutil.copy(slide_path, slides / f"{stem}.tiff")
    out = tmp_path / "out"
    job = cluster.submit(segment(str(slides), checkpoint, out))

    wait_until(lambda: any(out.glob("s*.json")), "the first finished slide")
    drivers = [p for p in family(cluster.sessions()) if "jobs/segment_slides.py" in p.cmd]
    assert drivers and cluster.status(job) == "RUNNING"
    kill_family({p.sid for p in drivers})
    finished = {p.stem for p in out.glob("s*.json")}
    assert 1 <= len(finished) < len(stems), finished  # killed mid-batch
    assert cluster.wait(job) == "FAILED"
    stamps = {stem: (out / f"{stem}.geojson.gz").stat().st_mtime_ns for stem in finished}

    again = cluster.submit(segment(str(slides), checkpoint, out))
    assert cluster.wait(again) == "SUCCEEDED", cluster.logs(again)
    rows = summary_rows(out)
    assert {stem: row["status"] for stem, row in rows.items()} == {
        stem: "skipped" if stem in finished else "complete" for stem in stems
    }
    for stem in stems:
        assert nuclei(out / f"{stem}.geojson.gz") == reference.nuclei, stem
    assert stamps == {s: (out / f"{s}.geojson.gz").stat().st_mtime_ns for s in finished}


@pytest.fixture(scope="module")
def training_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_datasets import write_folder_dataset

    from wsi_pipeline.train import ingest

    root = tmp_path_factory.mktemp("train-data")
    splits = ["train"] * 6 + ["val"] * 2
    data = write_folder_dataset(root / "synthetic", n=8, size=96, splits=splits)
    ingest.ingest_folder(data, root / "train.zarr")
    return root / "train.zarr"


def test_killed_training_worker_resumes_from_the_last_checkpoint(
    cluster: LoopbackCluster, training_store: Path, tmp_path: Path
) -> None:
    cluster.ensure_workers()
    out = tmp_path / "run"
    job = cluster.submit(
        f"python jobs/train.py --config configs/train/smoke.yaml --data {training_store} "
        f"--out {out} --epochs 4 --set max_failures=1"
    )
    # Ray Train writes this snapshot once it has registered a reported checkpoint.
    snapshot = out / "smoke" / "checkpoint_manager_snapshot.json"
    wait_until(snapshot.exists, "the first registered checkpoint")
    workers = [p for p in family(cluster.sessions()) if p.cmd.startswith("ray::RayTrainWorker")]
    assert len(workers) == 2 and cluster.status(job) == "RUNNING"
    kill(workers[:1])

    status = cluster.wait(job)
    logs = cluster.logs(job)
    assert status == "SUCCEEDED", logs
    resumed = [int(n) for n in re.findall(r"resuming after epoch (\d+)", logs)]
    assert len(resumed) == 1 and resumed[0] >= 1, logs  # one restart, from a checkpoint
    assert len(re.findall(r"epoch 1/4 train_loss", logs)) == 1  # epoch 0 never ran again
    with open(out / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["last_epoch"] == 3
    load_checkpoint(out / "best")  # weights_only=True
    assert not any(p.pid == workers[0].pid for p in processes())


def test_lost_worker_node_mid_job_gives_the_same_nuclei(
    cluster: LoopbackCluster, reference: Reference, slide_path: Path, checkpoint: Path, tmp_path
) -> None:
    cluster.ensure_workers()
    out = tmp_path / "out"
    job = cluster.submit(segment(str(slide_path), checkpoint, out))

    def predictor_node() -> Node | None:
        for node in cluster.nodes[1:]:
            if any(p.cmd.startswith("ray::MapWorker") for p in family({node.session})):
                return node
        return None

    wait_until(lambda: predictor_node() is not None, "the predictor actor")
    time.sleep(2.0)  # let some tiles through the predictor
    victim = predictor_node()
    assert victim is not None
    cluster.kill_node(victim)  # the node that holds the predictor, reads and post-processing
    assert cluster.status(job) == "RUNNING" and not (out / "synthetic.json").exists()

    status = cluster.wait(job)
    assert status == "SUCCEEDED", cluster.logs(job)
    assert nuclei(out / "synthetic.geojson.gz") == reference.nuclei
    assert cluster.alive_nodes() == 2  # the job finished on the surviving worker
