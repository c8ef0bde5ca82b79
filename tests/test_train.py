"""jobs/train.py end to end on the session's embedded Ray: 2 gloo workers, the
tiny preset, data and storage in a moto S3 bucket.

The runs are shared between tests (module-scoped fixtures) to keep the file
short on a 2-core machine:
- `first_run`: 4 + 4 steps; rank 1 exits its process at step 5 (once: a marker
  object in the bucket records it), so Ray Train restarts the worker group
  from the step-4 checkpoint and the run ends at step 8, exported.
- `second_run`: the same command and --name with 2 more stage-2 steps: it
  resumes at step 8 instead of starting over.
- `third_run`: that command again: the run is finished, nothing to do.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import uuid
from pathlib import Path

import pytest

from deconvnet import storage
from deconvnet.data import synthetic
from deconvnet.weights import load_model_dir
from jobs import train as train_job

ROOT = Path(__file__).resolve().parents[1]


def rank_exits_once(rank: int, at_call: int, marker: str):
    """A train loop: `train_loop_per_worker` in which DDP rank `rank` exits its
    process (a real worker death) at its `at_call`-th training step, once: the
    `marker` object records that it did. The fault lives here, in the test, by
    wrapping the production step; the job's code carries no hook for it."""
    def loop(config):
        import os

        import ray.train

        from deconvnet import storage
        from deconvnet.training import recipe

        step, calls = recipe.train_step, [0]

        def dying_step(*args, **kwargs):
            if (ray.train.get_context().get_world_rank() == rank and calls[0] == at_call
                    and not storage.exists(marker)):
                storage.write_bytes(marker, f"rank {rank} exited at step {at_call}\n".encode())
                os._exit(1)
            calls[0] += 1
            return step(*args, **kwargs)

        recipe.train_step = dying_step
        train_job.train_loop_per_worker(config)

    return loop


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    """One bucket for the module's runs (conftest's s3_bucket is per test)."""
    import s3fs

    name = f"train-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def data(bucket) -> str:
    uri = f"{bucket}/synth"
    synthetic.generate(uri, images=24, seed=0, size=128)  # 18 train, 6 val
    return uri


def _argv(data: str, bucket: str, stage2_steps: int) -> list[str]:
    return ["--data", data, "--storage", f"{bucket}/runs", "--name", "r1", "--preset", "tiny",
            "--num-workers", "2", "--batch-size", "8", "--micro-batch-size", "2",
            "--stage1-steps", "4", "--stage2-steps", str(stage2_steps), "--eval-every", "3",
            "--log-every", "1", "--eval-max-proposals", "0", "--lr", "0.02",
            "--export", f"{bucket}/models/r1",
            # Passed to s3fs (moto accepts any), and must come out redacted in config.json.
            "--storage-option", "key=testing", "--storage-option", "secret=testing"]


def _final(bucket: str) -> dict:
    return json.loads(storage.read_bytes(f"{bucket}/runs/r1/results/final.json"))


@pytest.fixture(scope="module")
def first_run(train_job_by_value, ray_session, data, bucket):
    marker = f"{bucket}/markers/rank1-died"
    this = sys.modules[__name__]  # the wrapped loop is defined here: Ray's workers get it by value
    ray_session.cloudpickle.register_pickle_by_value(this)
    try:
        rc = train_job.run(train_job.parse_config(_argv(data, bucket, 4)), rank_exits_once(1, 5, marker))
    finally:
        ray_session.cloudpickle.unregister_pickle_by_value(this)
    return {"rc": rc, "final": _final(bucket), "marker": marker,
            "history": storage.read_bytes(f"{bucket}/runs/r1/results/history.csv").decode()}


@pytest.fixture(scope="module")
def second_run(first_run, data, bucket):
    rc = train_job.main(_argv(data, bucket, 6))
    return {"rc": rc, "final": _final(bucket)}


def test_run_finishes_with_checkpoints_results_and_a_loadable_export(first_run, bucket):
    assert first_run["rc"] == 0
    assert first_run["final"]["step"] == 8
    run = f"{bucket}/runs/r1"
    files = storage.list_files(run)
    checkpoints = sorted({u.split("/")[-2] for u in files if "/checkpoint_0" in u})
    assert checkpoints, f"no checkpoint under {run}: {files}"
    for c in checkpoints:
        for name in ("model.safetensors", "config.json", "optimizer.safetensors", "train_state.json"):
            assert f"{run}/{c}/{name}" in files
    assert f"{run}/checkpoint_manager_snapshot.json" in files
    model, info = load_model_dir(f"{bucket}/models/r1")  # the segment job's loader
    assert info.provenance["steps"] == 8 and info.provenance["run_name"] == "r1"
    assert info.provenance["data"].endswith("/synth")
    assert info.provenance["val_mean_iou"] == pytest.approx(first_run["final"]["val"]["mean_iou"])
    results = f"{run}/results"
    assert "mean" in storage.read_bytes(f"{results}/val_iou.txt").decode()
    rows = list(csv.reader(io.StringIO(storage.read_bytes(f"{results}/val_iou.csv").decode())))
    assert rows[0] == ["class", "iou", "accuracy", "pixels"] and rows[1][0] == "background"
    assert storage.read_bytes(f"{results}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads(storage.read_bytes(f"{results}/config.json"))
    assert recorded["storage_options"] == {"key": "***", "secret": "***"}


def test_loss_falls(first_run):
    rows = list(csv.DictReader(io.StringIO(first_run["history"])))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 8
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"


def test_a_dead_worker_restarts_from_the_latest_checkpoint(first_run):
    assert storage.exists(first_run["marker"])  # rank 1 really exited at step 5
    # From the latest checkpoint Ray Train had committed when rank 1 died:
    # step 3's, or step 4's (stage 1's end) if the controller had collected that report.
    assert first_run["final"]["resumed_from"] in ([3], [4])
    assert first_run["final"]["step"] == 8


def test_same_name_resumes_instead_of_starting_over(second_run):
    assert second_run["rc"] == 0
    assert second_run["final"]["step"] == 10
    assert second_run["final"]["resumed_from"][-1] == 8
    assert len(second_run["final"]["resumed_from"]) == 2


def test_finished_run_is_not_trained_again(second_run, data, bucket, capsys):
    before = _final(bucket)
    assert train_job.main(_argv(data, bucket, 6)) == 0
    assert "already finished at step 10" in capsys.readouterr().out
    assert _final(bucket) == before


def test_resuming_with_other_data_is_refused(second_run, data, bucket, capsys):
    other = f"{bucket}/synth-copy"
    for uri in storage.list_files(data):
        storage.write_bytes(other + uri[len(data):], storage.read_bytes(uri))
    argv = _argv(data, bucket, 8)
    argv[1] = other
    with pytest.raises(SystemExit) as e:
        train_job.main(argv)
    assert e.value.code == 2
    assert "was started with data=" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--data": "s3://{bucket}/nothing"}, "no ImageSets/Segmentation/train.txt"),
    ({"--batch-size": "7"}, "does not split evenly over 2 workers"),
    ({"--micro-batch-size": "1"}, "a forward needs at least 2 crops"),
    ({"--lr": "-0.1"}, "--lr must be > 0"),
    ({"--lr": "fast"}, "invalid float value"),
    ({"--init": "s3://{bucket}/no-model"}, "--init:"),
    ({"--extra-train-list": "s3://{bucket}/no-list.txt"}, "--extra-train-list: no such file"),
])
def test_bad_arguments_exit_2_with_one_line(data, bucket, capsys, change, message):
    argv = _argv(data, bucket, 4)
    for flag, value in change.items():
        value = value.format(bucket=bucket)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as e:
        train_job.parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after argparse's usage lines
    assert last.startswith("train.py: error: ") and message in last


def test_a_checkpoint_half_written_when_the_job_died_is_not_the_latest(second_run, data, bucket):
    """Ray Train records a checkpoint in checkpoint_manager_snapshot.json only
    once it is fully written; what a job killed mid-upload leaves behind is a
    directory nobody resumes from."""
    run = f"{bucket}/runs/r1"
    model = storage.read_bytes(f"{run}/checkpoint_00000010/model.safetensors")
    storage.write_bytes(f"{run}/checkpoint_00000099/config.json",
                        storage.read_bytes(f"{run}/checkpoint_00000010/config.json"))
    storage.write_bytes(f"{run}/checkpoint_00000099/model.safetensors", model[: len(model) // 3])
    assert train_job.main(_argv(data, bucket, 7)) == 0
    final = _final(bucket)
    assert final["step"] == 11 and final["resumed_from"][-1] == 10
