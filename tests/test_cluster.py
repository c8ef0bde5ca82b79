"""The jobs as the README tells users to run them: `ray job submit --address
http://127.0.0.1:<port> --working-dir . -- python jobs/...` from the repo root,
against a real Ray cluster of three nodes started with `ray start` on this
machine (tests/clusterutil.py):

- head: `--num-cpus 0` (job drivers and the dashboard only), dashboard and job
  server on 127.0.0.1, its own `--temp-dir` under pytest's tmp;
- "gpu": `--num-gpus 1` and 1 CPU (there is no GPU: torch in the segment actor
  falls back to CPU, as it does on any node without CUDA);
- "cpu": `--num-cpus 2` and the resources ray_cluster.yaml's CPU node type
  advertises (the "crf" one per CPU), where the CRF tasks must go.

Object storage is the session's moto S3 server on 127.0.0.1; every node gets
AWS_ENDPOINT_URL and the test credentials in its environment, as a real node
gets its instance profile. One cluster for the whole module; each test looks
at what its job left in the bucket and at Ray's state API (placements), and
at the exit code of `ray job submit` itself.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import yaml
from clusterutil import ROOT, LocalCluster

from deconvnet import storage
from deconvnet.data import synthetic
from pipeline.job import CRF_RESOURCE
from test_faults import assert_one_ok_row_and_mask_per_input, upload_scenes
from test_pipeline import predictions, run_records

SUBMIT_TIMEOUT = 240


def cpu_node_resources(cpus: int) -> dict[str, int]:
    """The custom resources of ray_cluster.yaml's CPU node type, scaled to `cpus` CPUs."""
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    resources = config["available_node_types"]["cpu"]["resources"]
    return {k: v * cpus // resources["CPU"] for k, v in resources.items() if k not in ("CPU", "GPU")}


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """head (0 CPU) + gpu node (1 GPU, 1 CPU) + cpu node (2 CPU). Stopped by the
    processes this fixture started, never `ray stop` (which would take every Ray
    on the machine with it), and checked gone."""
    c = LocalCluster(tmp_path_factory.mktemp("rc"), dict(os.environ))  # AWS_ENDPOINT_URL set by s3_endpoint
    try:
        c.start_head(num_cpus=0)
        c.add_node(num_cpus=1, num_gpus=1)
        c.add_node(num_cpus=2, resources=cpu_node_resources(2))
        nodes = c.wait_for_nodes(3)
        assert len(nodes) == 3, f"nodes up: {nodes}"
        c.head = next(n.node_id for n in nodes if n.is_head_node)
        c.gpu = next(n.node_id for n in nodes if n.resources_total.get("GPU"))
        c.cpu = next(n.node_id for n in nodes if not n.is_head_node and not n.resources_total.get("GPU"))
        yield c
    finally:
        killed = c.stop()
        assert not c.pids(), "processes of the test cluster outlived stop()"
    assert not killed, f"processes that did not stop with their node and were SIGKILLed: {killed}"


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    """The module's bucket: a tiny model, a few images, a tiny VOC-layout set."""
    import s3fs
    import torch

    from deconvnet.model import PRESETS, DeconvNet
    from deconvnet.weights import ModelInfo, save_model_dir

    name = f"cluster-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    torch.manual_seed(0)
    save_model_dir(DeconvNet(PRESETS["tiny"]), f"s3://{name}/models/tiny", ModelInfo(config=PRESETS["tiny"]))
    return f"s3://{name}"


def submit(cluster: LocalCluster, submission_id: str, *entrypoint: str, wait: bool = True):
    """`ray job submit` exactly as the README writes it, run from the repo root."""
    args = ["job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
            "--working-dir", ".", *([] if wait else ["--no-wait"]), "--", "python", *entrypoint]
    return cluster.ray(*args, timeout=SUBMIT_TIMEOUT)


def job_info(cluster: LocalCluster, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id)


def wait_for(condition, timeout: float, every: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return condition()


def segment_argv(images: str, output: str, model: str, *extra: str) -> list[str]:
    return ["jobs/segment_dataset.py", "--input", images, "--output", output, "--model", model,
            "--device", "gpu", "--max-proposals", "3", "--batch-size", "8", "--images-per-batch", "2", *extra]


# --- 1. the segment job: actors on the GPU node, CRF on the CPU node ------------------------


def test_segment_job_runs_actors_on_the_gpu_node_and_crf_tasks_on_the_cpu_node(cluster, bucket):
    from ray.util.state import list_actors, list_tasks

    images = upload_scenes(f"{bucket}/seg", 6)
    output = f"{bucket}/seg/labels"
    p = submit(cluster, "segment-gpu", *segment_argv(images, output, f"{bucket}/models/tiny", "--crf", "paper"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "Job 'segment-gpu' succeeded" in p.stdout + p.stderr
    assert "done: 6 ok, 0 errors, 0 skipped of 6 images" in p.stdout  # the driver's log, followed

    rows = assert_one_ok_row_and_mask_per_input(images, output)
    assert all(r["classes"] and 0 < r["mean_confidence"] <= 1 for r in rows)
    (record,) = run_records(output)
    assert record["status"] == "completed" and record["counts"]["ok"] == 6
    assert record["config"]["device"] == "gpu" and record["config"]["crf"] == "paper"

    info = job_info(cluster, "segment-gpu")
    assert info.status == "SUCCEEDED" and info.driver_exit_code == 0
    assert info.driver_node_id == cluster.head  # drivers go to the head, which runs no tasks

    # Ray Data names a pool's actor class "MapWorker(MapBatches(<class>))" and a task after
    # its (fused) functions, "MapBatches(refine)->MapBatches(write)".
    seen: dict = {}

    def placements():
        seen["actors"] = list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", info.job_id)],
                                     detail=True, limit=1000, raise_on_missing_output=False)
        seen["tasks"] = list_tasks(address=cluster.dashboard_url, filters=[("job_id", "=", info.job_id)],
                                   detail=True, limit=10000, raise_on_missing_output=False)
        actors = [a for a in seen["actors"] if a.class_name.startswith("MapWorker(") and "Segment" in a.class_name]
        crf = [t for t in seen["tasks"]
               if t.type == "NORMAL_TASK" and "MapBatches(refine)" in t.name and t.state == "FINISHED"]
        return (actors, crf) if actors and crf else None

    found = wait_for(placements, timeout=20, every=1)  # task events reach the GCS within a second or so
    assert found, ("the state API shows no segment actor or no finished CRF task for the job: "
                   f"actors {sorted({a.class_name for a in seen['actors']})}, "
                   f"tasks {sorted({t.name for t in seen['tasks']})}")
    actors, crf = found
    for a in actors:
        assert a.node_id == cluster.gpu, f"segment actor on {a.node_id}, not the GPU node {cluster.gpu}"
        assert a.required_resources.get("GPU") == 1, a.required_resources
    for a in seen["actors"]:  # nothing else of the job holds the GPU
        assert not a.required_resources.get("GPU") or a in actors, (a.class_name, a.required_resources)
    for t in crf:  # every time: they ask for the "crf" resource only the CPU node has
        assert t.node_id == cluster.cpu, f"CRF task {t.name} on {t.node_id}, not the CPU node {cluster.cpu}"
        assert not t.required_resources.get("GPU") and t.required_resources.get("CPU") == 1
        assert t.required_resources.get(CRF_RESOURCE) == 1, t.required_resources
    # The CRF is scaled out over CPU workers (DESIGN.md), not run for the whole input in one
    # task: 6 images in batches of 2 are several tasks that can run side by side.
    assert len(crf) >= 2, f"the CRF of all 6 images ran in {len(crf)} task: {[t.name for t in crf]}"


# --- 2. exit codes reach `ray job submit` ------------------------------------------------------


def test_a_failing_job_fails_ray_job_submit(cluster, bucket):
    p = submit(cluster, "segment-bad-input",
               *segment_argv(f"{bucket}/no-such-prefix/", f"{bucket}/bad/labels", f"{bucket}/models/tiny"))
    # The script exits 2 (a bad argument); Ray 2.60's CLI exits 1 for any failed job.
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    assert "--input: nothing at" in p.stdout  # the script's one line, in the followed log
    assert "Job 'segment-bad-input' failed" in p.stdout + p.stderr
    info = job_info(cluster, "segment-bad-input")
    assert info.status == "FAILED" and info.driver_exit_code == 2
    assert not run_records(f"{bucket}/bad/labels")  # nothing started


# --- 3. training with Ray Train on the cluster ---------------------------------------------------


def test_train_job_with_two_workers_finishes(cluster, bucket):
    from ray.util.state import list_actors

    data = f"{bucket}/synth"
    synthetic.generate(data, images=8, seed=0, size=96)  # 6 train, 2 val
    p = submit(cluster, "train-2", "jobs/train.py", "--data", data, "--storage", f"{bucket}/runs", "--name", "c1",
               "--preset", "tiny", "--num-workers", "2", "--loader-workers", "0", "--batch-size", "4",
               "--stage1-steps", "2", "--stage2-steps", "1", "--eval-every", "3", "--eval-max-proposals", "0",
               "--export", f"{bucket}/models/c1")
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    assert "Job 'train-2' succeeded" in p.stdout + p.stderr
    final = json.loads(storage.read_bytes(f"{bucket}/runs/c1/results/final.json"))
    assert final["step"] == 3 and final["export"] == f"{bucket}/models/c1" and final["val"]
    assert storage.exists(f"{bucket}/models/c1/model.safetensors")
    info = job_info(cluster, "train-2")
    assert info.driver_exit_code == 0
    workers = [a for a in list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", info.job_id)],
                                      detail=True, limit=1000, raise_on_missing_output=False)
               if "Worker" in a.class_name and "Train" in a.class_name]
    assert len(workers) == 2, [(a.class_name, a.node_id) for a in workers]
    assert all(a.node_id != cluster.head for a in workers)  # the head has no CPUs for them


# --- 4. `ray job stop`, then the next incremental run finishes the rest -----------------------


def test_a_stopped_job_records_stopped_and_the_next_run_finishes_the_rest(cluster, bucket):
    # One CRF at a time on images this size: a second or more per image after the first
    # Parquet part, which leaves `ray job stop` the time it needs to start on a busy machine.
    n = 12
    images = upload_scenes(f"{bucket}/stop", n, h=180, w=240)
    output = f"{bucket}/stop/labels"
    argv = segment_argv(images, output, f"{bucket}/models/tiny", "--crf", "paper", "--part-rows", "2")
    p = submit(cluster, "segment-stopped", *argv, "--crf-cpus", "1", wait=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]

    def started() -> bool:  # its record says "running" and a first Parquet part is written
        if job_info(cluster, "segment-stopped").status != "RUNNING":
            return False
        records = run_records(output)
        try:
            parts = storage.list_files(storage.join(output, "predictions"), [".parquet"])
        except FileNotFoundError:
            parts = []
        return bool(records and records[0]["status"] == "running" and parts)

    def over() -> bool:
        return job_info(cluster, "segment-stopped").status.is_terminal()

    assert wait_for(lambda: started() or over(), timeout=120) and not over(), \
        f"the job did not get going, or finished first: {job_info(cluster, 'segment-stopped')}"
    stop = cluster.ray("job", "stop", "--address", cluster.dashboard_url, "segment-stopped", timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_info(cluster, "segment-stopped").status == "STOPPED"

    info = job_info(cluster, "segment-stopped")
    (record,) = run_records(output)
    # SIGTERM: it wrote what it had and said so before Ray's SIGKILL, 3 s later.
    assert record["status"] == "stopped" and record["stopped_by"] == "SIGTERM", (record, info)
    stopped_rows = predictions(output)
    assert 0 < len(stopped_rows) < n, "the job was not stopped mid-run"
    assert record["counts"]["ok"] == len(stopped_rows)  # none left unwritten in its buffer

    p = submit(cluster, "segment-rerun", *argv, "--incremental")  # the scheduled command: every CPU for the CRF
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rerun = next(r for r in run_records(output) if r["run_id"] != record["run_id"])
    assert rerun["status"] == "completed"
    assert rerun["counts"]["skipped"] == len(stopped_rows)
    assert rerun["counts"]["ok"] == n - len(stopped_rows)
    assert_one_ok_row_and_mask_per_input(images, output)  # all labelled, none twice
