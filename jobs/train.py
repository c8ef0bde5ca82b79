"""Train DeconvNet on a PASCAL VOC-layout dataset with Ray Train (DDP), in the paper's two stages.

On a cluster (see ray_cluster.yaml):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --data s3://bucket/VOC2012/ --storage s3://bucket/runs/ \\
        --name voc-paper --init s3://bucket/models/deconvnet-init/ \\
        --num-workers 8 --use-gpu --export s3://bucket/models/deconvnet/

On a laptop (no cluster address: an embedded local Ray is started):

    python -m deconvnet.data.synthetic --out data/synth --images 200
    python jobs/train.py --data data/synth --storage runs --name synth --preset tiny \\
        --num-workers 2 --export models/synth

Run the same command again with the same --name and it resumes from the run's
latest checkpoint; a finished run is not trained again. A worker that dies
restarts the worker group from the latest checkpoint (--max-failures times).

Under <storage>/<name>/: Ray Train's checkpoint_<step>/ directories (each also a
model directory) and its checkpoint_manager_snapshot.json, and results/ with
config.json (this run's settings, secrets redacted), val_iou.txt (per-class
IoU in the paper's Table 1 layout), val_iou.csv, history.csv, curves.png
(loss and val mean IoU over steps) and final.json once the run is done.

The driver only checks the arguments and builds ScalingConfig, RunConfig and
the TorchTrainer; all training is `train_loop_per_worker(config)`, on every
worker (`--num-workers 0` runs it in this process, Ray Train's local mode,
with no checkpoints: for debugging). The torch parts are deconvnet/training/recipe.py,
crops.py, voc.py and rundir.py.
Exit codes: 0 done (or nothing to do), 1 training failed, 2 a bad argument.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deconvnet import storage
from deconvnet.training import crops, recipe, rundir
from deconvnet.cli import Flag, add_flags, add_storage_option_arg, config_error, flag, storage_options_from
from deconvnet.records import now_iso
from deconvnet.training.recipe import RECIPES, TRAINING_PROPOSALS, TrainConfig, config_for
from deconvnet.data.voc import TRAIN_LIST, VAL_LIST, VocDataset, open_train_val
from deconvnet.weights import ModelInfo, read_model_info

if TYPE_CHECKING:
    import torch

# Fields that must match when a run with the same --name is resumed.
RESUME_KEYS = ("data", "extra_train_lists", "preset", "init")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The whole training, on one DDP rank: restore the latest checkpoint if
    any, then steps of `recipe.train_step`, with evaluation, results and a
    checkpoint every `eval_every` steps, and the export at the end.
    `config["train"]` is the TrainConfig.
    """
    # Imports here, not at the top: this function is pickled by value, and
    # cloudpickle cannot pickle torch's pseudo-modules that a global `torch` drags in.
    import ray.train
    import ray.train.torch
    import torch

    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    assert world == cfg.world_size, f"{world} workers started, the config says {cfg.world_size}"
    device = ray.train.torch.get_device()
    say = _say if rank == 0 else (lambda text: None)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model, info, state, optimizer_state = rundir.load_checkpoint(d)
        state.resumed_from.append(state.step)
        say(f"resuming {cfg.name} from step {state.step}")
    else:
        (model, info), state, optimizer_state = recipe.initial_model(cfg), rundir.TrainState(), None
    recipe.autotune_convolutions(device)
    model = ray.train.torch.prepare_model(model)  # DDP (nccl on GPU, gloo on CPU), on `device`
    optimizer = recipe.make_optimizer(recipe.unwrap(model), cfg)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)  # after the move: its tensors follow the params' device

    train, val = open_train_val(cfg.data, cfg.extra_train_lists, cfg.storage_options)
    say(f"{len(train)} training and {len(val)} val images, {len(info.classes)} classes; global batch "
        f"{cfg.batch_size} = {world} workers x {cfg.accumulation} forwards x {cfg.crops_per_forward} crops")
    batches, loader_stage, window, tick = None, 0, [], time.perf_counter()
    while state.step < cfg.total_steps:
        stage = cfg.stage_of(state.step)
        if stage != loader_stage:  # each stage has its own sample stream, restored by position
            first = 0 if stage == 1 else cfg.stage1_steps
            batches = crops.crop_loader(_stage_dataset(train, stage, cfg, info, say), cfg, rank, world,
                                        start=(state.step - first) * cfg.per_rank,
                                        pin_memory=device.type == "cuda")
            loader_stage = stage
        lr = recipe.learning_rate(cfg, state.step)
        forwards = [next(batches) for _ in range(cfg.accumulation)]
        window.append(recipe.train_step(model, optimizer, forwards, lr, device))
        state.step += 1
        evaluate_now = state.step % cfg.eval_every == 0 or state.step in (cfg.stage1_steps, cfg.total_steps)
        if state.step % cfg.log_every == 0 or evaluate_now:
            loss = recipe.all_reduce_(torch.stack(window).mean()).item() / world
            state.log.append({"step": state.step, "stage": stage, "lr": lr, "loss": loss})
            now = time.perf_counter()
            say(f"step {state.step}/{cfg.total_steps} stage {stage} lr {lr:.2e} loss {loss:.4f} "
                f"({(now - tick) / len(window):.2f} s/step)")
            window, tick = [], now
        if evaluate_now:
            _evaluate_and_report(model, optimizer, info, val, cfg, state, rank, world, device)

    if rank == 0:
        net = recipe.unwrap(model)
        exported = rundir.export_model(net, info, cfg, state) if cfg.export else None
        rundir.write_final(cfg, state, exported)
        if exported:
            say(f"exported {cfg.export} (model id {exported.model_id})")


def _stage_dataset(train: VocDataset, stage: int, cfg: TrainConfig, info: ModelInfo,
                   say: Callable[[str], None]) -> crops.CropDataset:
    """The stage's crops; stage 1 with classes balanced by repetition when the recipe says so."""
    entries = None
    if stage == 1 and cfg.balance_classes:
        t0 = time.perf_counter()
        entries = crops.class_balanced_entries(train.classes_present())
        say(f"stage 1: {len(entries)} class-balanced entries over {len(train)} images "
            f"({time.perf_counter() - t0:.1f} s to read the labels)")
    return crops.CropDataset(train, stage, cfg, info, entries)


def _evaluate_and_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: ModelInfo,
                         val: VocDataset, cfg: TrainConfig, state: rundir.TrainState,
                         rank: int, world: int, device: torch.device) -> None:
    """Val confusion matrix over all ranks (each takes every world-th image),
    the results files, and one `ray.train.report` with the checkpoint.

    Ray Train uploads rank 0's checkpoint directory to
    <storage>/<name>/checkpoint_<step>/ first and only then registers it (and
    rewrites checkpoint_manager_snapshot.json), so a checkpoint half-written
    when the job dies is never the one a restart resumes from."""
    import ray.train
    import torch

    from deconvnet.metrics import ConfusionMatrix

    net = recipe.unwrap(model)
    recipe.broadcast_buffers_(net)  # every rank evaluates the weights rank 0 checkpoints and exports
    cm = recipe.evaluate(net, val, info, cfg.evaluation(), device, indices=range(rank, len(val), world))
    cm = ConfusionMatrix.from_matrix(recipe.all_reduce_(torch.from_numpy(cm.matrix).to(device)).cpu())
    state.evals.append({"step": state.step, "mean_iou": cm.mean_iou(), "pixel_accuracy": cm.pixel_accuracy(),
                        "mean_accuracy": cm.mean_accuracy()})
    metrics = {"step": state.step, "stage": cfg.stage_of(state.step - 1), "loss": state.log[-1]["loss"],
               **{k: v for k, v in cm.summary(info.classes).items() if v == v}}  # NaN: class absent
    name = f"checkpoint_{state.step:08d}"
    if rank == 0:
        _say(f"val after step {state.step}: mean IoU {cm.mean_iou():.4f}, pixel accuracy "
             f"{cm.pixel_accuracy():.4f}\n{cm.table(info.classes, name='IoU %')}")
        rundir.write_results(cfg, state, cm, info.classes)
        with tempfile.TemporaryDirectory() as d:
            rundir.save_checkpoint(d, net, info, optimizer, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)


def _say(text: str) -> None:
    """One line to the job's output. Not `print`: Ray Train patches it to log
    every line twice from a worker."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------- driver

def flags() -> list[Flag]:
    """Every option and the TrainConfig field it sets. Its default in the help is
    the field's in a run of each preset that sets nothing else (the proposal
    settings as the inference mode table fills them)."""
    paper, tiny = (config_for(preset, data="", storage="", name="defaults", random_encoder=True).record()
                   for preset in ("paper", "tiny"))

    def option(name: str, help: str, **options: Any) -> Flag:
        field = flag(name).field
        ending = f" (default: {paper[field]}; {tiny[field]} with --preset tiny)" \
            if tiny[field] != paper[field] else f" (default: {paper[field]})"
        return flag(name, help=help + ending, **options)

    return [
        flag("--data", required=True, metavar="URI",
             help="PASCAL VOC-layout root URI: JPEGImages/, SegmentationClass/ (palette PNGs, "
                  "255 = ignore), SegmentationObject/ when present, ImageSets/Segmentation/{train,val}.txt"),
        flag("--extra-train-list", "extra_train_lists", action="append", default=[], metavar="URI",
             help="another training list (repeatable), e.g. SBD-augmented ids; lines are ids or "
                  "'IMAGE LABEL' paths relative to --data; val images in it are dropped"),
        flag("--storage", required=True, metavar="URI", help="URI under which <name>/ holds checkpoints and results"),
        flag("--name", help="run name; the same name resumes that run (default: deconvnet-<preset>)"),
        flag("--preset", choices=sorted(RECIPES), default="paper",
             help="architecture (without --init) and recipe defaults: 'paper' is the published "
                  "network and solver, 'tiny' a small net for CPUs and tests (default: paper)"),
        flag("--init", metavar="URI",
             help="model directory to start from, e.g. from `python -m deconvnet init --vgg16 ...` or "
                  "`python -m deconvnet convert-caffe --kind vgg16 ...`; its classes are used. A paper "
                  "run needs it, or --random-encoder"),
        flag("--random-encoder", action="store_true", default=None,
             help="without --init, start the paper preset from a random encoder (VOC's 21 classes) "
                  "on purpose; it trains far worse than from ImageNet weights"),
        option("--num-workers", "DDP workers, one GPU each with --use-gpu; 0 runs in this process without "
                                "checkpoints", type=int),
        flag("--use-gpu", action="store_true", default=None, help="one GPU per worker (nccl, bf16 autocast)"),
        option("--batch-size", "GLOBAL batch of crops per step, split over the workers", type=int),
        option("--micro-batch-size", "crops per forward on a worker, so BatchNorm's batch; a worker's share is "
                                     "accumulated over several forwards", type=int),
        option("--lr", "SGD learning rate at the start of each stage", type=float),
        option("--momentum", "SGD momentum", type=float),
        option("--weight-decay", "L2 on conv weights (and BN with --decay-bn), never on biases", type=float),
        option("--bias-lr-mult", "biases learn at this times the lr (the prototxts' blobs_lr 2)", type=float),
        option("--decay-bn", "weight decay on BN scale/shift too (the prototxts set no multiplier on BN)",
               action=argparse.BooleanOptionalAction, default=None),
        option("--lr-gamma", "step-decay factor", type=float),
        option("--stage1-steps", "steps on object-centred crops", type=int),
        option("--stage1-lr-step", "stage 1: multiply the lr by --lr-gamma every this many steps", type=int),
        option("--balance-classes", "stage 1: balance classes by repeating the images of rare ones",
               action=argparse.BooleanOptionalAction, default=None),
        option("--stage2-steps", "steps on proposal crops", type=int),
        option("--stage2-lr-step", "stage 2: multiply the lr by --lr-gamma every this many steps", type=int),
        option("--proposals", "proposal generator for stage 2 and val", choices=TRAINING_PROPOSALS),
        option("--eval-every", "steps between val evaluations, each with a checkpoint", type=int),
        option("--eval-max-proposals", "val proposals per image (+ the whole image), as the segment job's "
                                       "--max-proposals", type=int),
        option("--log-every", "steps between logged losses", type=int),
        option("--loader-workers", "DataLoader processes per worker", type=int),
        option("--max-failures", "worker-group restarts from the latest checkpoint (-1: no limit)", type=int),
        option("--keep-checkpoints", "checkpoints kept in storage", type=int),
        flag("--export", metavar="URI", help="model directory to write at the end, for the segment job"),
        option("--seed", "seed of the initialisation, shuffles and crops", type=int),
    ]


def parser_and_flags() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser and its {config field: flag} map."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    return p, {**add_flags(p, flags()), **add_storage_option_arg(p)}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse and check everything that can be checked before work starts; a
    problem is parser.error: one line naming the flag, exit code 2."""
    parser, flag_of = parser_and_flags()
    a = vars(parser.parse_args(argv))
    opts = storage_options_from(parser, a.pop("storage_option"))
    values = {k: v for k, v in a.items() if k in flag_of}
    values["extra_train_lists"] = tuple(values["extra_train_lists"])
    values["name"] = values["name"] or f"deconvnet-{a['preset']}"
    try:
        cfg = config_for(values.pop("preset"), **values, storage_options=opts)
        check_inputs(cfg)
        check_resumable(cfg)
    except ValueError as e:
        parser.error(config_error(e, flag_of))
    return cfg


def check_inputs(cfg: TrainConfig) -> None:
    """The data layout, the lists and `init`, read from storage. ValueError on a problem."""
    opts = cfg.storage_options
    try:
        for rel in (TRAIN_LIST, VAL_LIST):
            if not storage.exists(storage.join(cfg.data, rel), opts):
                raise ValueError(f"`data` {cfg.data}: no {rel} (expected the PASCAL VOC layout: "
                                 f"JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
        for uri in cfg.extra_train_lists:
            if not storage.exists(uri, opts):
                raise ValueError(f"`extra_train_lists`: no such file {uri}")
    except OSError as e:  # unreachable endpoint, bad credentials, missing bucket
        raise ValueError(f"`data` {cfg.data}: cannot read: {type(e).__name__}: {e}") from e
    if cfg.init:
        try:
            info = read_model_info(cfg.init, opts)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"`init`: {e}") from e
        if not recipe.init_matches_preset(info, cfg.preset):
            raise ValueError(f"`init` {cfg.init} is not a '{cfg.preset}' DeconvNet ({info.config}); "
                             f"pass the `preset` it was made with")


def check_resumable(cfg: TrainConfig) -> None:
    """A run with this name that trained on other data (or from another init)
    must not be resumed by mistake."""
    recorded = rundir.read_config(cfg)
    if recorded is None:
        return
    now = cfg.record()

    def same(a: Any, b: Any) -> bool:  # 's3://b/voc/' is 's3://b/voc'
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(map(same, a, b))
        return a == b or (isinstance(a, str) and isinstance(b, str) and a.rstrip("/") == b.rstrip("/"))

    changed = [k for k in RESUME_KEYS if not same(recorded.get(k), now[k])]
    if changed:
        was = ", ".join(f"{k}={recorded.get(k)!r}" for k in changed)
        raise ValueError(f"run {cfg.name!r} under {cfg.storage} was started with {was}; "
                         f"use another `name` or the same settings to resume it")


def run(cfg: TrainConfig, train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker) -> int:
    """Train (or resume) the run with `train_loop` on every worker. 0: finished;
    1: training failed; 2: storage not writable."""
    final = rundir.read_final(cfg)
    if final and final["step"] >= cfg.total_steps:
        val = final.get("val") or {}
        print(f"run {cfg.name!r} already finished at step {final['step']} (val mean IoU "
              f"{val.get('mean_iou', float('nan')):.4f}); nothing to do. Results: {rundir.results_uri(cfg)}")
        return 0
    try:
        rundir.write_config(cfg, launched=now_iso())
    except OSError as e:  # missing bucket, no permission
        print(f"train.py: --storage {cfg.storage}: cannot write: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    if cfg.num_workers and not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins the cluster; without it an
        # embedded local Ray starts, whose workers inherit this environment.
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    fs, path = storage.pyarrow_filesystem(cfg.storage, cfg.storage_options)
    scaling = (ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                             resources_per_worker={"CPU": 1 + cfg.loader_workers})
               if cfg.num_workers else ScalingConfig(num_workers=0))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg},
        scaling_config=scaling,
        run_config=RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)))
    try:
        trainer.fit()
    except TrainingFailedError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"train.py: training failed: {first}", file=sys.stderr)
        return 1
    final = rundir.read_final(cfg)
    assert final, f"training ended without {rundir.FINAL_FILE} under {rundir.results_uri(cfg)}"
    val = final.get("val") or {}
    print(f"run {cfg.name!r} finished at step {final['step']}: val mean IoU {val.get('mean_iou', float('nan')):.4f}, "
          f"pixel accuracy {val.get('pixel_accuracy', float('nan')):.4f}; results: {rundir.results_uri(cfg)}"
          + (f"; model: {final['export']} ({final['model_id']})" if final["export"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return run(parse_config(argv))


if __name__ == "__main__":
    sys.exit(main())
