"""The demo model kept in the repository (models/demo/, behind `make demo`): it
loads, its provenance names the commands that made it relative to the
repository, and its labels of held-out generated scenes mean something."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from deconvnet.data import synthetic
from deconvnet.inference import for_mode
from deconvnet.inference.crf import label_map
from deconvnet.inference.proposals import propose
from deconvnet.inference.segmenter import Segmenter
from deconvnet.metrics import ConfusionMatrix
from deconvnet.weights import load_model_dir
from jobs import demo

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo"


def test_the_kept_model_loads_and_says_how_to_make_it_again():
    text = (MODEL / "config.json").read_text()
    assert not re.search(r'"/|[A-Za-z]:\\\\', text)  # no path of the machine that trained it
    provenance = json.loads(text)["provenance"]
    assert provenance["data"] == "demo-out/data" and provenance["made_by"] == "make demo-model"
    assert provenance["data_command"] == "python -m deconvnet.data.synthetic --out demo-out/data --images 120 --seed 0"
    assert provenance["train_command"] == " ".join(["python jobs/train.py --data demo-out/data", *demo.TRAIN,
                                                    "--storage demo-out/runs --name", demo.RUN_NAME,
                                                    "--export models/demo"])
    assert provenance["val_mean_iou"] > 0.8
    assert (MODEL / "model.safetensors").stat().st_size < 5_000_000
    _, info = load_model_dir(str(MODEL))  # the weights match the config
    assert list(info.classes[:5]) == ["background", "aeroplane", "bicycle", "bird", "boat"]
    makefile = (ROOT / "Makefile").read_text()
    assert "demo-model: venv\n\t$(PY) jobs/demo.py --retrain\n" in makefile


def test_its_labels_of_held_out_scenes_mean_something():
    """Three val scenes of the demo's data (seed 0), which it never trained on,
    labelled as training evaluates (default mode, no CRF): most pixels right."""
    val = np.random.default_rng(0).permutation(120)[:30]  # synthetic.generate's val split
    cfg = for_mode("default", crf="none", max_proposals=10)
    segmenter = Segmenter.from_model_dir(str(MODEL), cfg.segmenter)
    cm = ConfusionMatrix(segmenter.num_classes)
    for i in val[:3]:
        scene = synthetic.sample(np.random.default_rng([0, int(i)]))
        probs = segmenter.probabilities([scene.image], [propose(scene.image, cfg.proposals)])[0]
        cm.update(label_map(scene.image, probs, None).labels, scene.classes)
    assert cm.pixel_accuracy() > 0.9 and cm.mean_iou() > 0.6, (cm.pixel_accuracy(), cm.mean_iou())
