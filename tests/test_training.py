"""deconvnet/training/recipe.py: the recipe's config checks, optimiser groups,
schedule, loss and evaluation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deconvnet.training import recipe
from deconvnet.metrics import ConfusionMatrix
from deconvnet.model import build_model, preset
from deconvnet.training.recipe import config_for, learning_rate
from deconvnet.data.voc import IGNORE_INDEX, open_train_val


def test_param_groups_carry_the_prototxts_multipliers():
    """Weights: lr, decayed. Biases: 2 x lr, not decayed. BN: lr, decayed."""
    model = build_model(preset("tiny", num_classes=5))
    weights, biases, bn = recipe.param_groups(model, 5e-4)
    assert (weights["weight_decay"], weights["lr_mult"]) == (5e-4, 1.0)
    assert (biases["weight_decay"], biases["lr_mult"]) == (0.0, 2.0)
    assert (bn["weight_decay"], bn["lr_mult"]) == (5e-4, 1.0)
    ids = {name: {id(p) for p in g["params"]} for name, g in zip(("w", "b", "bn"), (weights, biases, bn))}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert id(m.weight) in ids["bn"] and id(m.bias) in ids["bn"]
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            assert id(m.bias) in ids["b"] and id(m.weight) in ids["w"]
    assert sum(map(len, ids.values())) == len(list(model.parameters()))
    opt = recipe.make_optimizer(model, config_for("paper", data="d", storage="s", name="n", init="m"))
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.01
    x, y = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long)
    recipe.train_step(model, opt, [(x, y)], 0.01, torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02, 0.01]
    tiny = recipe.make_optimizer(model, config_for("tiny", data="d", storage="s", name="n"))
    assert [(g["lr_mult"], g["weight_decay"]) for g in tiny.param_groups] == [(1.0, 5e-4), (1.0, 0.0), (1.0, 0.0)]


def test_step_decay_restarts_at_each_stage_with_its_own_step():
    cfg = config_for("paper", data="d", storage="s", name="n", random_encoder=True, stage1_steps=30,
                     stage2_steps=50, stage1_lr_step=20, stage2_lr_step=15, lr_gamma=0.1)
    assert [round(learning_rate(cfg, s), 6) for s in (0, 19, 20, 29, 30, 44, 45, 59, 60, 79)] == \
        [0.01, 0.01, 0.001, 0.001, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.00001]


def test_the_paper_recipe_is_the_solvers():
    """HyeonwooNoh/DeconvNet training/001_stage_1 and 002_stage_2 solvers: stepsize
    9000 then 10000, max_iter 20000 then 40000; data batch 8 x iter_size 8."""
    cfg = config_for("paper", data="d", storage="s", name="n", init="m")
    assert (cfg.stage1_lr_step, cfg.stage2_lr_step, cfg.stage1_steps, cfg.stage2_steps) == (9000, 10000, 20000, 40000)
    assert (cfg.batch_size, cfg.crops_per_forward, cfg.accumulation) == (64, 8, 8)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_gamma) == (0.01, 0.9, 5e-4, 0.1)
    assert cfg.balance_classes
    eight = config_for("paper", data="d", storage="s", name="n", init="m", num_workers=8)
    assert (eight.crops_per_forward, eight.accumulation) == (8, 1)  # BN still over 8 crops


def test_a_paper_run_without_an_imagenet_encoder_must_say_so():
    with pytest.raises(ValueError, match="`init`.*`random_encoder`"):
        config_for("paper", data="d", storage="s", name="n")
    assert config_for("paper", data="d", storage="s", name="n", random_encoder=True).init is None
    assert config_for("tiny", data="d", storage="s", name="n").random_encoder  # the tiny net has no VGG16


def test_config_checks_and_the_tiny_recipe():
    cfg = config_for("tiny", data="d", storage="s", name="n", num_workers=2, micro_batch_size=4)
    assert (cfg.batch_size, cfg.crops_per_forward, cfg.accumulation) == (16, 4, 2)
    assert config_for("paper", data="d", storage="s", name="n", init="m").batch_size == 64
    for bad, message in (({"batch_size": 10, "num_workers": 4}, "split evenly"),
                         ({"micro_batch_size": 3}, "does not divide"), ({"micro_batch_size": 1}, "at least 2 crops"),
                         ({"lr": -1.0}, "`lr`"), ({"stage1_steps": 0, "stage2_steps": 0}, "positive sum"),
                         ({"name": "a/b"}, "`name`")):
        with pytest.raises(ValueError, match=message):
            config_for("paper", data="d", storage="s", init="m", **{"name": "n", **bad})
    assert "secret" not in repr(dataclasses.replace(cfg, storage_options={"secret": "hunter2"}))


def test_loss_ignores_the_ignore_label():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0
    target = torch.tensor([[[1, 1], [IGNORE_INDEX, IGNORE_INDEX]]])
    assert recipe.segmentation_loss(logits, target).item() < 1e-3
    assert recipe.segmentation_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX)).item() == 0.0


def test_evaluate_counts_every_labelled_val_pixel(voc):
    model, info = recipe.initial_model(voc)
    _, val = open_train_val(voc.data, voc.extra_train_lists)
    from deconvnet.inference import for_mode

    cm = recipe.evaluate(model, val, info, for_mode(max_proposals=2, crf="none"))
    assert isinstance(cm, ConfusionMatrix) and model.training  # train mode restored
    labelled = sum(int((val.load(i).classes != IGNORE_INDEX).sum()) for i in range(len(val)))
    assert cm.matrix.sum() == labelled
