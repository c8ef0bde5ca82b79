"""The run directory: everything a training run keeps under <storage>/<name>/.

    checkpoint_<step>/        Ray Train's checkpoints: each a model directory
                              (model.safetensors + config.json) + optimizer.safetensors
                              + train_state.json (`save_checkpoint`, `load_checkpoint`)
    results/config.json       the run's settings, secrets redacted (`write_config`)
    results/val_iou.txt, .csv the latest val table, Table 1 layout (`write_results`)
    results/history.csv       loss and val metrics over steps; results/curves.png
    results/final.json        written last: its presence means the run finished

Ray Train writes the checkpoint directories and its snapshot itself; this
module owns every other path under the run, so there is one place to look.
No pickle anywhere: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .. import storage
from ..metrics import ConfusionMatrix
from ..records import now_iso, read_json, write_json
from ..weights import ModelInfo, load_model_dir, save_model_dir

if TYPE_CHECKING:
    from .recipe import TrainConfig

RESULTS_DIR = "results"  # under <storage>/<name>/, beside Ray Train's checkpoint_* dirs
CONFIG_FILE = "config.json"  # in results/: the settings the run was started with
FINAL_FILE = "final.json"  # in results/, written last: its presence means the run is finished
OPTIMIZER_FILE = "optimizer.safetensors"  # in a checkpoint
STATE_FILE = "train_state.json"  # in a checkpoint


def run_uri(config: TrainConfig) -> str:
    return storage.join(config.storage, config.name)


def results_uri(config: TrainConfig) -> str:
    return storage.join(run_uri(config), RESULTS_DIR)


def write_config(config: TrainConfig, **extra: Any) -> None:
    """results/config.json: the run's settings (secrets redacted) and `extra`."""
    write_json(storage.join(results_uri(config), CONFIG_FILE), {**config.record(), **extra},
               config.storage_options)


def read_config(config: TrainConfig) -> dict[str, Any] | None:
    """The settings this run was first started with, or None for a new run."""
    try:
        return read_json(storage.join(results_uri(config), CONFIG_FILE), config.storage_options)
    except FileNotFoundError:
        return None


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights, and the curves so far."""

    step: int = 0  # steps done
    log: list[dict[str, float]] = field(default_factory=list)  # {step, stage, lr, loss}
    evals: list[dict[str, float]] = field(default_factory=list)  # {step, mean_iou, pixel_accuracy, mean_accuracy}
    resumed_from: list[int] = field(default_factory=list)  # the step of every resume

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrainState:
        return cls(step=int(d["step"]), log=list(d["log"]), evals=list(d["evals"]),
                   resumed_from=list(d["resumed_from"]))


def save_checkpoint(directory: str, model: nn.Module, info: ModelInfo, optimizer: torch.optim.Optimizer,
                    state: TrainState) -> None:
    """Write a checkpoint directory: a model directory (`model.safetensors` +
    `config.json`, loadable by `load_model_dir`), the optimizer's tensors as
    safetensors, and the step, curves and optimizer settings as JSON. No pickle."""
    save_model_dir(model, directory, info)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    storage.write_bytes(storage.join(directory, OPTIMIZER_FILE), st_save(tensors))
    payload = {"state": state.to_json(),
               "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    write_json(storage.join(directory, STATE_FILE), payload, indent=1)


def load_checkpoint(directory: str) -> tuple[nn.Module, ModelInfo, TrainState, dict[str, Any]]:
    """(model in train mode, its info, the train state, an optimizer state dict
    to load once the optimizer exists) from a `save_checkpoint` directory."""
    model, info = load_model_dir(directory)
    payload = read_json(storage.join(directory, STATE_FILE))
    state: dict[int, dict[str, Any]] = {}
    for key, value in st_load(storage.read_bytes(storage.join(directory, OPTIMIZER_FILE))).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in payload["optimizer"]["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer_state = {"state": state, "param_groups": payload["optimizer"]["param_groups"]}
    return model.train(), info, TrainState.from_json(payload["state"]), optimizer_state


def history_csv(state: TrainState) -> str:
    """One row per logged step: step, stage, lr, loss, and the val scores where evaluated."""
    evals = {int(e["step"]): e for e in state.evals}
    steps = sorted({int(r["step"]) for r in state.log} | set(evals))
    logs = {int(r["step"]): r for r in state.log}
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["step", "stage", "lr", "loss", "val_mean_iou", "val_pixel_accuracy"])
    for s in steps:
        r, e = logs.get(s, {}), evals.get(s, {})
        out.writerow([s, r.get("stage", ""), _num(r.get("lr")), _num(r.get("loss")),
                      _num(e.get("mean_iou")), _num(e.get("pixel_accuracy"))])
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def plot_curves(state: TrainState, stage1_steps: int) -> bytes:
    """PNG: training loss and val mean IoU over steps, the stage change marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in state.log], [r["loss"] for r in state.log], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_iou.plot([e["step"] for e in state.evals], [e["mean_iou"] for e in state.evals], marker="o", lw=1)
    ax_iou.set(xlabel="step", ylabel="val mean IoU", title="val mean IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        if 0 < stage1_steps < state.step:
            ax.axvline(stage1_steps, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_results(config: TrainConfig, state: TrainState, cm: ConfusionMatrix,
                  class_names: Sequence[str]) -> None:
    """Under <storage>/<name>/results/: the latest val table (the paper's Table 1
    layout) and per-class CSV, the history CSV and the curves PNG."""
    uri, opts = results_uri(config), config.storage_options
    step = state.step
    header = (f"val after step {step} (stage {config.stage_of(step - 1)}): mean IoU {cm.mean_iou():.4f}, "
              f"pixel accuracy {cm.pixel_accuracy():.4f}, {int(cm.matrix.sum())} pixels\n\n")
    storage.write_bytes(storage.join(uri, "val_iou.txt"),
                        (header + cm.table(class_names, name=f"step {step}") + "\n").encode(), opts)
    storage.write_bytes(storage.join(uri, "val_iou.csv"), cm.to_csv(class_names).encode(), opts)
    storage.write_bytes(storage.join(uri, "history.csv"), history_csv(state).encode(), opts)
    storage.write_bytes(storage.join(uri, "curves.png"), plot_curves(state, config.stage1_steps), opts)


def export_model(model: nn.Module, info: ModelInfo, config: TrainConfig, state: TrainState) -> ModelInfo:
    """Write the trained model directory to --export, with its provenance."""
    last = state.evals[-1] if state.evals else {}
    val = config.evaluation().proposals
    provenance = {
        "created": now_iso(), "created_by": "jobs/train.py", "run_name": config.name,
        "data": config.data, "extra_train_lists": list(config.extra_train_lists),
        "preset": config.preset, "init": config.init,
        "steps": state.step, "stage1_steps": config.stage1_steps, "stage2_steps": config.stage2_steps,
        "batch_size": config.batch_size, "val_mean_iou": last.get("mean_iou"),
        "val_pixel_accuracy": last.get("pixel_accuracy"),
        "val_proposals": f"{val.method} top {val.max_proposals}" + (" + whole image" if val.whole_image else ""),
        "encoder_init": info.provenance.get("encoder_init"),
    }
    out = dataclasses.replace(info, provenance=provenance, model_id="")
    return save_model_dir(model, config.export, out, config.storage_options)


def read_final(config: TrainConfig) -> dict[str, Any] | None:
    """The run's final.json (written when it finished), or None."""
    try:
        return read_json(storage.join(results_uri(config), FINAL_FILE), config.storage_options)
    except FileNotFoundError:
        return None


def write_final(config: TrainConfig, state: TrainState, export_info: ModelInfo | None) -> dict[str, Any]:
    final = {"run": config.name, "finished": now_iso(), "step": state.step,
             "stage1_steps": config.stage1_steps, "stage2_steps": config.stage2_steps,
             "val": state.evals[-1] if state.evals else None, "resumed_from": state.resumed_from,
             "export": config.export, "model_id": export_info.model_id if export_info else None}
    write_json(storage.join(results_uri(config), FINAL_FILE), final, config.storage_options)
    return final
