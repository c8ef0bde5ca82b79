"""What ships for running on a cluster and on a schedule: ray_cluster.yaml
against the schema Ray ships (and Ray's own config checks), the resources the
jobs ask for, the systemd units (systemd-analyze verify), the cron line, and
the KubeRay manifests; every scheduled command line must parse with the
segment job's own argument parser."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from deconvnet.training.recipe import TrainConfig
from pipeline.config import SegmentJobConfig
from pipeline.job import CRF_RESOURCE
from jobs import segment_dataset

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
WORKERS = {k: v for k, v in CLUSTER["available_node_types"].items() if k != CLUSTER["head_node_type"]}


def _default(cls, name: str):
    return cls.__dataclass_fields__[name].default


# ------------------------------------------------------------ ray_cluster.yaml

def test_cluster_config_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)


def test_cluster_config_passes_rays_own_checks():
    """What `ray up` does before it calls AWS: fill in the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(CLUSTER))
    validate_config(config)
    assert set(config["available_node_types"]) == {"head", "gpu", "cpu"}


def test_worker_types_carry_what_the_jobs_ask_for():
    gpu = [t for t in WORKERS.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in WORKERS.values() if not t["resources"].get("GPU")]
    assert gpu and cpu, "a GPU worker type (segment actors, training) and a CPU one (CRF)"
    per_actor = _default(SegmentJobConfig, "gpus_per_actor")  # --gpus-per-actor
    # A training worker with --use-gpu asks for 1 GPU and 1 + --loader-workers CPUs (jobs/train.py).
    train_cpus = 1 + _default(TrainConfig, "loader_workers")
    for t in gpu:
        gpus, cpus = t["resources"]["GPU"], t["resources"]["CPU"]
        assert gpus >= per_actor
        assert cpus >= train_cpus * gpus, f"{cpus} CPUs cannot feed {gpus} training workers of {train_cpus} CPUs"
        # 0 is fine: the scheduled segment job passes --device gpu, which asks for GPUs.
    for t in cpu:
        assert t["resources"]["CPU"] >= 1  # a CRF task takes 1 CPU
        assert t["resources"][CRF_RESOURCE] == t["resources"]["CPU"]  # and one "crf": one task per CPU
    for t in gpu:
        assert CRF_RESOURCE not in t["resources"]  # the CRF never competes with reading for the GPUs
    for t in WORKERS.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in WORKERS.values()) <= CLUSTER["max_workers"]
    head = CLUSTER["available_node_types"][CLUSTER["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no task or actor lands on the head


def test_every_node_installs_the_project_from_the_working_tree():
    mounts = CLUSTER["file_mounts"]
    (remote,) = [r for r, local in mounts.items() if local == "."]
    cpu_nodes = CLUSTER["setup_commands"]
    gpu_nodes = WORKERS["gpu"]["worker_setup_commands"]  # replaces setup_commands on that type
    for commands in (cpu_nodes, gpu_nodes):
        text = "\n".join(commands)
        assert re.search(r"pip install -q torch==\d+\.\d+\.\d+", text), "torch pinned"
        assert text.index("torch==") < text.index(f"pip install -q -e {remote}"), "torch before the project"
    assert "download.pytorch.org/whl/cpu" in "\n".join(cpu_nodes)
    assert "whl/cpu" not in "\n".join(gpu_nodes)


SECRET_KEY = re.compile(r"secret|password|token|access_key|credential|private_key", re.I)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|-----BEGIN|aws_secret_access_key", re.I)


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", str(k)
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, str(node)


def test_no_secrets_and_no_public_dashboard():
    text = (ROOT / "ray_cluster.yaml").read_text()
    for path, value in _walk(CLUSTER):
        assert not SECRET_KEY.search(path), f"secret-looking key {path}"
        assert not SECRET_VALUE.search(value), f"secret-looking value at {path}"
    assert "ssh_private_key" not in CLUSTER["auth"]
    for t in WORKERS.values():
        assert "IamInstanceProfile" in t["node_config"], "workers read buckets through an instance profile"
    # The dashboard and job API listen on the head's loopback, reached through `ray dashboard`.
    start = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in text
    for rule in CLUSTER["provider"]["security_group"]["IpPermissions"]:
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 0), f"rule opens the dashboard: {rule}"


# ------------------------------------------------------------ scheduled runs

def _segment_args(command: str) -> list[str]:
    """The segment job's arguments in a shell command line, checked by its own parser
    (up to the first shell operator, with systemd's ${VAR}s left as placeholders)."""
    words = shlex.split(command)
    (start,) = [i + 1 for i, w in enumerate(words) if w.endswith("jobs/segment_dataset.py")]
    args = []
    for w in words[start:]:
        if w in ("&&", "||", ">>", ">", "2>&1", ";", "|"):
            break
        args.append(w)
    a = segment_dataset.build_parser().parse_args(args)
    assert a.incremental, "a scheduled run labels only what is new"
    assert a.device == "gpu", "GPU nodes may be at zero when the schedule fires: ask for GPUs"
    assert "--incremental" in args
    return args


CRON_FIELD = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _cron_field_ok(field: str, lo: int, hi: int) -> bool:
    for part in field.split(","):
        m = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if not m:
            return False
        if m.group(1) != "*":
            ends = [int(x) for x in m.group(1).split("-")]
            if not all(lo <= e <= hi for e in ends) or ends != sorted(ends):
                return False
        if m.group(2) is not None and int(m.group(2)) < 1:
            return False
    return True


def test_cron_line_parses():
    lines = [ln for ln in (DEPLOY / "crontab").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    env = [ln for ln in lines if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", ln)]
    jobs = [ln for ln in lines if ln not in env]
    assert len(jobs) == 2, jobs  # the hourly labelling and the daily compaction of its predictions/
    commands = []
    for job in jobs:
        fields = job.split(None, 5)
        assert len(fields) == 6, "5 time fields and a command"
        for f, (lo, hi) in zip(fields[:5], CRON_FIELD):
            assert _cron_field_ok(f, lo, hi), f"bad cron field {f!r}"
        command = fields[5]
        assert "%" not in command, "cron turns % into a newline"
        assert "ray job submit" in command and "--no-wait" not in command  # its exit code is the job's outcome
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
        commands.append(command)
    segment, compaction = commands
    output = _segment_args(segment)[_segment_args(segment).index("--output") + 1]
    words = shlex.split(compaction)
    assert "jobs/compact_predictions.py" in compaction and words[words.index("--output") + 1] == output
    lock = re.search(r"flock -n -E 0 (\S+)", segment).group(1)
    assert f"flock -n -E 0 {lock} " in compaction  # never beside a labelling run


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    units = [DEPLOY / "deconvnet-segment.service", DEPLOY / "deconvnet-segment.timer"]
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "deconvnet-segment" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr  # unknown settings are only warnings


def test_systemd_service_submits_the_incremental_job():
    unit = (DEPLOY / "deconvnet-segment.service").read_text()
    (start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    assert "ray job submit" in start and "--no-wait" not in start
    _segment_args(start)
    assert re.search(r"^Type=oneshot$", unit, re.M)  # the timer never starts a second run while one is going
    assert re.search(r"^OnCalendar=hourly$", (DEPLOY / "deconvnet-segment.timer").read_text(), re.M)


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def test_kuberay_rayjob_runs_the_incremental_job_on_gpu_and_cpu_workers():
    (job,) = _docs("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"]  # a new name every hour
    spec = job["spec"]
    _segment_args(spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= _default(SegmentJobConfig, "gpus_per_actor")
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = int(groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert json.loads(json.loads(groups["cpu"]["rayStartParams"]["resources"])) == {CRF_RESOURCE: cpus}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for path, value in _walk(job):
        assert not SECRET_KEY.search(path) and not SECRET_VALUE.search(value), path


def test_kuberay_cronjob_creates_the_rayjob_hourly_and_fails_with_it():
    docs = {d["kind"]: d for d in _docs("kuberay-cronjob.yaml")}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(_cron_field_ok(f, *r) for f, r in zip(fields, CRON_FIELD))
    assert fields[1:] == ["*", "*", "*", "*"], "hourly"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    rules = docs["Role"]["rules"]
    assert any("rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"]) for r in rules)
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == "deconvnet-rayjob"  # made from deploy/kuberay-rayjob.yaml


@pytest.mark.parametrize("job_status, exit_code", [("SUCCEEDED", 0), ("FAILED", 1), ("", 1)])
def test_kuberay_cronjob_script_exits_with_the_ray_jobs_outcome(tmp_path, job_status, exit_code):
    """The CronJob's shell script against a stand-in kubectl that reports a finished RayJob."""
    cron = {d["kind"]: d for d in _docs("kuberay-cronjob.yaml")}["CronJob"]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
case "$*" in
  "create -f /manifests/rayjob.yaml -o name") echo rayjob.ray.io/deconvnet-segment-x1 ;;
  *jobDeploymentStatus*) echo Complete ;;
  *jobStatus*) echo {job_status} ;;
  "delete "*) ;;
  *) exit 3 ;;
esac
""")
    kubectl.chmod(0o755)
    r = subprocess.run(["/bin/sh", "-c", container["args"][0]], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert r.returncode == exit_code, r.stdout + r.stderr
    deleted = "delete rayjob.ray.io/deconvnet-segment-x1" in (tmp_path / "calls").read_text()
    assert deleted == (exit_code == 0)  # a failed RayJob is kept for inspection
