"""A real multi-node Ray cluster on this machine, started and stopped the way an
operator does it (`ray start --head`, `ray start --address`), for tests that
drive the jobs through `ray job submit` as users do.

    cluster = LocalCluster(tmp_dir, env)
    cluster.start_head()                        # no CPUs for tasks, dashboard on 127.0.0.1
    gpu = cluster.add_node(num_cpus=1, num_gpus=1)
    cpu = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes(3)
    cluster.ray("job", "submit", "--address", cluster.dashboard_url, ...)
    cluster.stop()                              # only what this object started

Every node is `ray start --block` run as our child, with its own ports (free
ones, so it never meets another Ray on the machine: the default dashboard
agent port 52365, client port 10001 and worker ports 10002-19999 would), with
`--temp-dir` under the test's tmp directory (never /tmp/ray), and with a
marker variable in its environment that every process of the cluster
inherits (GCS, raylets, agents, workers, job drivers). `stop()` asks each
`ray start` to shut its node down (SIGTERM: it kills the processes it
started), then SIGKILLs whatever still carries the marker. `ray stop` is not
used: it kills every Ray process of the user on the machine, whoever
started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "DECONVNET_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start` gets SIGTERM when the test process dies, even by SIGKILL (PR_SET_PDEATHSIG),
# and shuts its node down: a killed pytest leaves no cluster behind. setpriv is util-linux's.
WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def processes_with(marker: str, value: str) -> list[int]:
    """PIDs whose environment holds marker=value (the processes of one cluster)."""
    needle = f"{marker}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return pids


class LocalCluster:
    def __init__(self, temp_dir: Path, env: dict[str, str]):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex
        env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        self.env = {
            **env,
            # `python` in a job's entrypoint is this venv's, as on a node where the project is installed.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "AWS_EC2_METADATA_DISABLED": "true",
            # SIGTERM to `ray start --block` shuts the node down at once instead of draining for 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            MARKER: self.id,
        }
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None

    # ------------------------------------------------------------ start

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        ports = ["--node-manager-port", free_port(), "--object-manager-port", free_port(),
                 "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
                 "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port(),
                 "--min-worker-port", 0, "--max-worker-port", 0]  # 0: workers take ports the OS gives
        log = self.temp_dir / f"{name}.log"
        # No --node-ip-address: Ray replaces 127.0.0.1 with the host's routable address
        # anyway (services.resolve_ip_for_localhost); joining nodes use --address 127.0.0.1:<port>.
        cmd = [*WITH_PARENT, RAY, "start", "--block", "--temp-dir", str(self.temp_dir / name), "--disable-usage-stats",
               *args, *map(str, ports)]
        with open(log, "wb") as out:
            node = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        self.logs.append(log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return node
            if node.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray start {' '.join(args)} did not come up:\n{log.read_text(errors='replace')[-4000:]}")

    def start_head(self, num_cpus: int = 0) -> None:
        gcs_port, dashboard_port = free_port(), free_port()
        self._start(["--head", "--port", str(gcs_port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                     "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port())], "head")
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"

    def add_node(self, num_cpus: int, num_gpus: int = 0, resources: dict | None = None) -> None:
        assert self.gcs_address, "start_head first"
        args = ["--address", self.gcs_address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]
        if resources:
            args += ["--resources", json.dumps(resources)]
        self._start(args, f"node{len(self.nodes)}")

    def wait_for_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        """The cluster's alive nodes, once there are n, from the state API."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = [n_ for n_ in list_nodes(address=self.dashboard_url, detail=True, raise_on_missing_output=False)
                         if n_.state == "ALIVE"]
            except Exception:  # noqa: BLE001  the dashboard is still starting: refused, 503, ...
                nodes = []
            if len(nodes) >= n or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    # ------------------------------------------------------------ use

    def ray(self, *args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user runs it from the repo root (no RAY_ADDRESS)."""
        return subprocess.run([RAY, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def popen(self, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
        return subprocess.Popen([RAY, *args], cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def pids(self) -> list[int]:
        """Every live process of this cluster."""
        return processes_with(MARKER, self.id)

    def session_logs(self) -> list[Path]:
        return [p for p in self.temp_dir.glob("*/session_*/logs/*") if p.is_file()]

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float = 30) -> list[int]:
        """Shut down the nodes this object started, workers first, then the head.
        Returns the PIDs that had to be SIGKILLed after the graceful stop."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        # A raylet kills its workers as it exits; give them a moment, then make sure.
        end = time.monotonic() + 5
        while self.pids() and time.monotonic() < end:
            time.sleep(0.2)
        leftover = self.pids()
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftover
