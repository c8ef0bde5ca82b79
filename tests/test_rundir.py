"""deconvnet/training/rundir.py: checkpoints round-trip as model directories."""

from __future__ import annotations

import torch

from deconvnet.training import recipe, rundir
from deconvnet.training.crops import CropDataset, crop_loader
from deconvnet.data.voc import open_train_val
from deconvnet.weights import load_model_dir


def test_checkpoint_round_trip_is_a_model_dir(voc, tmp_path):
    model, info = recipe.initial_model(voc)
    opt = recipe.make_optimizer(model, voc)
    train, _ = open_train_val(voc.data, voc.extra_train_lists)
    batch = next(crop_loader(CropDataset(train, 1, voc, info), voc, 0, 1, start=0))
    recipe.train_step(model, opt, [batch], 0.01, torch.device("cpu"))
    state = rundir.TrainState(step=1, log=[{"step": 1, "stage": 1, "lr": 0.01, "loss": 3.0}])
    d = str(tmp_path / "ckpt")
    rundir.save_checkpoint(d, model, info, opt, state)
    loaded, info2, state2, opt_state = rundir.load_checkpoint(d)
    assert state2 == state and info2.classes == info.classes
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = recipe.make_optimizer(loaded, voc)
    opt2.load_state_dict(opt_state)
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert before.keys() == after.keys()
    for i in before:
        assert torch.equal(before[i]["momentum_buffer"], after[i]["momentum_buffer"]), i
    assert load_model_dir(d)[1].config == info.config  # the segment job's loader reads it
