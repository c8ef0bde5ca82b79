"""The segment job under faults, against the real S3 endpoint and the session's Ray:
processes killed mid-run (a segment actor, a CRF task, the job's own driver),
object storage answering errors or going away, and credentials that must never
show up anywhere.

Each test checks the invariant users rely on: exactly one row per input, no
duplicates, every mask present, or a clear failure with a record of what
finished.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import _save, scene
from PIL import Image
from s3faults import S3FaultProxy, wait_for
from test_pipeline import FAST, predictions, run_records

from deconvnet import storage
from deconvnet.data.voc import decode_label_png
from pipeline import layout
from jobs import segment_dataset


ROOT = Path(__file__).resolve().parents[1]


def upload_scenes(base: str, n: int, h: int = 120, w: int = 160) -> str:
    prefix = storage.join(base, "images")
    for i in range(n):
        storage.write_bytes(storage.join(prefix, f"cam{i % 2}", f"img_{i:02d}.jpg"),
                            _save(Image.fromarray(scene(h, w, seed=i)), "JPEG", quality=90))
    return prefix


def assert_one_ok_row_and_mask_per_input(images: str, output: str) -> list[dict]:
    inputs = storage.list_files(images)
    rows = predictions(output)
    uris = [r["image_uri"] for r in rows]
    assert sorted(uris) == sorted(inputs), "rows are not exactly one per input"
    for r in rows:
        assert r["status"] == "ok", r["error"]
        mask = decode_label_png(storage.read_bytes(r["mask_uri"]))
        assert mask.shape == (r["height"], r["width"])
    return rows


def ray_pids(title: str) -> list[int]:
    """Processes whose Ray process title starts with `title` (Ray sets it to
    `ray::<actor class or task name>` while they run)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(title):
            pids.append(int(path.split("/")[2]))
    return pids


class Killer(threading.Thread):
    """Once `ready()` holds, SIGKILLs the first process titled `title`, once."""

    def __init__(self, title: str, ready, timeout: float = 120):
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout = title, ready, timeout
        self.killed: int | None = None
        self.done = threading.Event()

    def run(self):
        end = time.monotonic() + self.timeout
        while not self.done.is_set() and time.monotonic() < end:
            pids = ray_pids(self.title) if self.ready() else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                self.killed = pids[0]
                return
            time.sleep(0.05)


def masks_written(output: str):
    def check() -> bool:
        try:
            return bool(storage.list_files(layout.masks_uri(output)))
        except FileNotFoundError:
            return False
    return check


# --- processes killed ------------------------------------------------------------


def test_a_killed_segment_actor_is_replaced_and_nothing_is_lost(ray_session, s3_bucket, tiny_model):
    images = upload_scenes(s3_bucket, 16)
    output = storage.join(s3_bucket, "labels")
    killer = Killer("ray::MapWorker(MapBatches(SegmentActor))", masks_written(output))
    killer.start()
    rc = segment_dataset.main(["--input", images, "--output", output, "--model", tiny_model, "--crf", "none",
                               "--max-proposals", "8", "--images-per-batch", "2", "--batch-size", "8"])
    killer.done.set()
    assert killer.killed, "the segment actor was never seen running"
    assert rc == 0
    assert_one_ok_row_and_mask_per_input(images, output)
    assert not os.path.exists(f"/proc/{killer.killed}")


def test_a_killed_crf_task_is_retried_and_nothing_is_lost(ray_session, s3_bucket, tiny_model):
    images = upload_scenes(s3_bucket, 12, h=240, w=320)  # big enough for the CRF to take a while
    output = storage.join(s3_bucket, "labels")
    killer = Killer("ray::MapBatches(refine)", lambda: True)
    killer.start()
    rc = segment_dataset.main(["--input", images, "--output", output, "--model", tiny_model, "--crf", "paper",
                               *FAST])
    killer.done.set()
    assert killer.killed, "no CRF task was seen running"
    assert rc == 0
    assert_one_ok_row_and_mask_per_input(images, output)


def _parts(output: str) -> list[str]:
    try:
        return storage.list_files(layout.predictions_uri(output), [layout.PART_SUFFIX])
    except FileNotFoundError:
        return []


def test_a_killed_job_rerun_incrementally_finishes_without_duplicates(ray_session, s3_bucket, tiny_model):
    images = upload_scenes(s3_bucket, 16)
    output = storage.join(s3_bucket, "labels")
    argv = ["--input", images, "--output", output, "--model", tiny_model, "--crf", "none",
            "--max-proposals", "8", "--images-per-batch", "2", "--part-rows", "2"]
    # The job as a user runs it: its own driver process, here joined to the session's Ray.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "jobs/segment_dataset.py", *argv], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    try:
        assert wait_for(lambda: len(_parts(output)) >= 1 or driver.poll() is not None, timeout=180)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_rows = predictions(output)
    assert 0 < len(killed_rows) < 16, "the driver was not killed mid-run"
    record = run_records(output)[0]
    assert record["status"] == "running"  # the killed run says it never finished

    # Ray cleans up the dead driver's actors and tasks; the re-run does only what is missing.
    second = segment_dataset.parse_config([*argv, "--incremental"])
    from pipeline.job import run

    result = run(second)
    assert result["counts"]["skipped"] == len(killed_rows)
    assert result["counts"]["ok"] == 16 - len(killed_rows)
    assert_one_ok_row_and_mask_per_input(images, output)


def test_a_stopped_job_writes_what_it_received_records_stopped_and_the_rerun_labels_the_rest(
        ray_session, s3_bucket, tiny_model):
    n = 16
    images = upload_scenes(s3_bucket, n)
    output = storage.join(s3_bucket, "labels")
    # Parts of 4 rows and batches of 2: at any time some rows wait in the driver's buffer.
    argv = ["--input", images, "--output", output, "--model", tiny_model, "--crf", "none",
            "--max-proposals", "8", "--images-per-batch", "2", "--part-rows", "4"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "jobs/segment_dataset.py", *argv], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: bool(_parts(output)) or driver.poll() is not None, timeout=180)
        driver.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err
    (record,) = run_records(output)
    assert record["status"] == "stopped" and record["stopped_by"] == "SIGTERM", record
    stopped_rows = predictions(output)
    assert 0 < len(stopped_rows) < n, "the driver was not stopped mid-run"
    # Every row it had received is in a part (none left in its buffer), each whole.
    assert record["counts"]["ok"] + record["counts"]["error"] == len(stopped_rows)
    assert sorted(record["prediction_parts"]) == _parts(output)
    for r in stopped_rows:
        assert r["status"] == "ok" and r["run_id"] == record["run_id"]
        assert decode_label_png(storage.read_bytes(r["mask_uri"])).shape == (r["height"], r["width"])

    assert segment_dataset.main([*argv, "--incremental"]) == 0
    rerun = next(r for r in run_records(output) if r["run_id"] != record["run_id"])
    assert rerun["status"] == "completed"
    assert rerun["counts"]["skipped"] == len(stopped_rows) and rerun["counts"]["ok"] == n - len(stopped_rows)
    assert_one_ok_row_and_mask_per_input(images, output)  # each image exactly once: none lost, none twice


# --- object storage faults -----------------------------------------------------------


@pytest.fixture
def proxy(s3_endpoint):
    p = S3FaultProxy(s3_endpoint).start()
    yield p
    p.stop()


def test_storage_calls_ride_out_slowdowns_and_an_outage(proxy, s3_bucket):
    opts = {"endpoint_url": proxy.endpoint}
    uri = storage.join(s3_bucket, "x/a.bin")
    proxy.fail(lambda method, path: True, times=12)  # more than botocore and s3fs retry on their own
    storage.write_bytes(uri, b"payload", opts)
    assert storage.read_bytes(uri, opts) == b"payload"
    assert proxy.injected == 12
    proxy.down(seconds=3)  # connection refused, then back
    t0 = time.monotonic()
    assert storage.read_bytes(uri, opts) == b"payload"
    assert time.monotonic() - t0 >= 2.5
    assert storage.list_files(storage.join(s3_bucket, "x"), storage_options=opts) == [uri]


def test_storage_gives_up_after_its_budget_with_a_clear_error(proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    opts = {"endpoint_url": proxy.endpoint, "key": "AKIASECRETKEYID", "secret": "never-print-this"}
    proxy.fail(lambda method, path: True)
    with pytest.raises(storage.StorageUnavailable) as e:
        storage.read_bytes(storage.join(s3_bucket, "x/a.bin"), opts)
    message = str(e.value)
    assert "read s3://" in message and "retry budget 2 s" in message and "Service Unavailable" in message
    assert "never-print-this" not in message
    # A missing object is not retried.
    proxy.clear()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_bucket, "missing"), opts)


def test_the_job_completes_through_slowdowns_and_an_endpoint_restart(ray_session, proxy, s3_bucket, tiny_model):
    images = upload_scenes(s3_bucket, 12)
    output = storage.join(s3_bucket, "labels")
    # Every fourth request of the run answers 503 SlowDown; the first mask write takes the endpoint down for 4 s.
    proxy.fail(lambda method, path: True, every=4)
    outage = threading.Event()

    def on_request(method: str, path: str) -> None:
        if method == "PUT" and "/masks/" in path and not outage.is_set():
            outage.set()
            threading.Thread(target=proxy.down, kwargs={"seconds": 4}, daemon=True).start()

    proxy.on_request = on_request
    rc = segment_dataset.main(["--input", images, "--output", output, "--model", tiny_model, "--crf", "none",
                               "--storage-option", f"endpoint_url={proxy.endpoint}", *FAST])
    assert outage.is_set() and proxy.injected > 10
    assert rc == 0
    proxy.clear()
    assert_one_ok_row_and_mask_per_input(images, output)


def test_the_job_fails_clearly_when_storage_does_not_come_back(ray_session, proxy, s3_bucket, tiny_model,
                                                               monkeypatch, capsys):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "3")  # the driver's budget travels to every worker
    images = upload_scenes(s3_bucket, 12)
    output = storage.join(s3_bucket, "labels")
    # Masks of the second half never get written: 503 for ever.
    proxy.fail(lambda method, path: method == "PUT" and "/masks/" in path and
               int(path.rsplit("img_", 1)[-1][:2]) >= 6)
    rc = segment_dataset.main(["--input", images, "--output", output, "--model", tiny_model, "--crf", "none",
                               "--storage-option", f"endpoint_url={proxy.endpoint}", "--part-rows", "1",
                               "--images-per-batch", "1", "--max-proposals", "3"])
    # Ray Data logs its progress and the stage's stack to stderr too; the job's own word is one line.
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segment_dataset:")]
    assert rc == 1
    assert len(said) == 1 and "failed after" in said[0], said
    assert "StorageUnavailable: write s3://" in said[0] and "/masks/" in said[0] and "retry budget 3 s" in said[0]
    proxy.clear()
    record = run_records(output)[0]
    assert record["status"] == "failed" and "StorageUnavailable" in record["error"]
    rows = predictions(output)
    assert record["counts"]["ok"] == len(rows) < 12  # the record says exactly what finished
    for r in rows:
        assert int(r["image_uri"].rsplit("img_", 1)[-1][:2]) < 6 and storage.exists(r["mask_uri"])


# --- secrets ---------------------------------------------------------------------------


def test_credentials_never_reach_logs_records_parquet_or_errors(ray_session, s3_bucket, tiny_model, tmp_path):
    env_secret, option_secret = "EnvSecret0123456789abcdefXYZ", "OptionSecret9876543210zyxwvuQ"
    images = upload_scenes(s3_bucket, 3)
    output = storage.join(s3_bucket, "labels")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": env_secret, storage.RETRY_SECONDS_ENV: "2",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    base = [sys.executable, "jobs/segment_dataset.py", "--model", tiny_model, "--crf", "none",
            "--storage-option", "key=AKIAEXAMPLE", "--storage-option", f"secret={option_secret}", *FAST]
    runs = [
        [*base, "--input", images, "--output", output, "--gallery"],  # succeeds
        [*base, "--input", storage.join(s3_bucket, "nothing-here"), "--output", output],  # exit 2
        [*base, "--input", images, "--output", output,  # an unreachable endpoint: exit 2
         "--storage-option", "endpoint_url=http://127.0.0.1:9"],
    ]
    seen = []
    for argv in runs:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        seen.append(p.stdout + p.stderr)
    assert "done: 3 ok" in seen[0] and "--input" in seen[1] and "--input" in seen[2]
    for uri in storage.list_files(output):
        seen.append(storage.read_bytes(uri).decode("latin-1"))
    for path in glob.glob("/tmp/ray/session_latest/logs/*"):  # the session's Ray: every worker's log
        if os.path.isfile(path):
            with open(path, "rb") as f:
                seen.append(f.read().decode("latin-1"))
    for text in seen:
        assert env_secret not in text and option_secret not in text
    record = run_records(output)[0]
    assert record["config"]["storage_options"]["secret"] == "***"


# --- hostile keys and content ------------------------------------------------------------


def test_hostile_keys_stay_under_the_output_and_hostile_files_are_bounded(ray_session, s3_bucket, tiny_model):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    good = _save(Image.fromarray(scene()), "JPEG", quality=90)
    wide = _save(Image.fromarray(np.zeros((2, 50_000, 3), np.uint8)), "PNG")  # 50,000 pixels wide
    keys = {
        "data/in/../../escape.jpg": good, "data/in/a/../../../etc/passwd.jpg": good,
        "data/in//abs/root.jpg": good, "data/in/./dot.jpg": good, "data/in/sp ace/ü 名前.jpg": good,
        "data/in/wide.png": wide,
    }
    for key, body in keys.items():  # raw keys, as any client may write them
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    noise = np.random.default_rng(0).bytes(200 * 2**20)  # claims to be a JPEG, is 200 MB of noise
    s3.put_object(Bucket=bucket, Key="data/in/noise.jpg", Body=noise)
    del noise
    before = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}

    output = f"{s3_bucket}/data/out"
    assert segment_dataset.main(["--input", f"{s3_bucket}/data/in", "--output", output, "--model", tiny_model,
                                 "--crf", "none", "--overlays", "--gallery", *FAST]) == 0
    after = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    written = after - before
    assert written and all(k.startswith("data/out/") for k in written), sorted(written)
    assert not any(".." in k.split("/") or "//" in k for k in written), sorted(written)
    rows = {r["image_uri"].rsplit("/", 1)[-1]: r for r in predictions(output)}
    assert len(rows) == len(keys) + 1
    assert rows["wide.png"]["status"] == "error" and "50000" in rows["wide.png"]["error"].replace(",", "")
    assert rows["noise.jpg"]["status"] == "error" and rows["noise.jpg"]["permanent"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 5, {k: r["error"] for k, r in rows.items()}
