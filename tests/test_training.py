"""The pure-torch training parts: objects and components, the two stages' crops
and labels, augmentation, optimiser groups, schedule, sampling, checkpoints,
evaluation."""

from __future__ import annotations

import dataclasses
from collections import deque
from itertools import islice

import numpy as np
import pytest
import torch

from deconvnet import synthetic, training
from deconvnet.metrics import ConfusionMatrix
from deconvnet.model import build_model, preset
from deconvnet.geometry import (
    box_iou,
    connected_components,
    enlarge_boxes,
    find_instances,
    matching_proposals,
    object_labels,
)
from deconvnet.training import (
    CropDataset,
    TrainConfig,
    VocSample,
    config_for,
    crop_and_augment,
    learning_rate,
)
from deconvnet.voc import IGNORE_INDEX
from deconvnet.weights import ModelInfo, load_model_dir


def _bfs_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Reference: breadth-first 4-connected labelling in raster order."""
    h, w = mask.shape
    out = np.zeros((h, w), np.int32)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not out[y, x]:
                n += 1
                out[y, x] = n
                todo = deque([(y, x)])
                while todo:
                    cy, cx = todo.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not out[ny, nx]:
                            out[ny, nx] = n
                            todo.append((ny, nx))
    return out, n


def test_connected_components_hand_made():
    mask = np.array([
        [1, 1, 0, 0, 1],
        [0, 1, 0, 1, 0],  # (1, 3) touches (0, 4) only diagonally: separate
        [0, 0, 0, 1, 0],
        [1, 0, 0, 0, 0],
    ], dtype=bool)
    labels, n = connected_components(mask)
    assert n == 4
    np.testing.assert_array_equal(labels, [
        [1, 1, 0, 0, 2],
        [0, 1, 0, 3, 0],
        [0, 0, 0, 3, 0],
        [4, 0, 0, 0, 0],
    ])
    assert connected_components(np.zeros((3, 3), bool))[1] == 0


def test_connected_components_spiral_and_random_match_bfs():
    spiral = np.zeros((15, 15), bool)  # one long snake: many union-find rounds
    spiral[0, :] = spiral[:, 14] = spiral[14, :] = spiral[2:, 0] = True
    spiral[2, 0:12] = spiral[2:12, 12] = spiral[12, 2:13] = spiral[4:12, 2] = True
    rng = np.random.default_rng(0)
    for mask in [spiral, *(rng.random((40, 50)) < p for p in (0.3, 0.5, 0.6))]:
        labels, n = connected_components(mask)
        ref, ref_n = _bfs_components(mask)
        assert n == ref_n
        np.testing.assert_array_equal(labels, ref)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Two class-3 objects touching only at a 255 border, one class-1 object."""
    classes = np.zeros((40, 60), np.uint8)
    objects = np.zeros((40, 60), np.uint8)
    classes[5:15, 5:20] = 3
    objects[5:15, 5:20] = 1
    classes[5:15, 21:30] = 3
    objects[5:15, 21:30] = 2
    classes[5:15, 20] = objects[5:15, 20] = IGNORE_INDEX
    classes[25:35, 40:55] = 1
    objects[25:35, 40:55] = 3
    classes[24, 40:55] = objects[24, 40:55] = IGNORE_INDEX
    return classes, objects


def test_find_instances_from_objects_and_from_components_agree():
    classes, objects = _scene()
    for found in (find_instances(classes, objects), find_instances(classes, None)):
        got = sorted((o.class_id, tuple(o.box)) for o in found)
        assert got == [(1, (40, 25, 55, 35)), (3, (5, 5, 20, 15)), (3, (21, 5, 30, 15))]


def test_min_side_drops_small_objects():
    classes, objects = _scene()
    kept = find_instances(classes, objects, min_side=10)  # boxes are 15x10, 9x10, 15x10
    assert sorted(tuple(o.box) for o in kept) == [(5, 5, 20, 15), (40, 25, 55, 35)]


def test_stage1_labels_only_the_chosen_object():
    classes, objects = _scene()
    chosen = next(o for o in find_instances(classes, objects) if tuple(o.box) == (21, 5, 30, 15))
    labels = object_labels(classes, chosen)
    assert labels[5:15, 21:30].tolist() == (np.full((10, 9), 3)).tolist()  # the object keeps its class
    assert (labels[5:15, 5:20] == 0).all()  # the other class-3 object is background
    assert (labels[25:35, 40:55] == 0).all()  # so is the class-1 object
    assert (labels[classes == IGNORE_INDEX] == IGNORE_INDEX).all()  # borders stay ignored
    assert set(np.unique(labels)) == {0, 3, IGNORE_INDEX}


def _dataset_for(stage: int, cfg: TrainConfig | None = None) -> CropDataset:
    cfg = cfg or config_for("tiny", data="mem", storage="mem", name="t")
    info = ModelInfo(config=preset("tiny", num_classes=21))
    return CropDataset(training.VocDataset([]), stage, cfg, info)


def test_stage1_target_is_the_enlarged_box_of_one_object():
    classes, objects = _scene()
    image = np.zeros((*classes.shape, 3), np.uint8)
    sample = VocSample(image, classes, objects)
    objs = find_instances(classes, objects)
    ds = _dataset_for(1)
    seen = set()
    for seed in range(20):
        box, labels = ds.target(sample, objs, np.random.default_rng(seed))
        match = [o for o in objs if np.allclose(box, enlarge_boxes(o.box[None], 1.2)[0])]
        assert len(match) == 1, f"box {box} is no object's 1.2x box"
        np.testing.assert_array_equal(labels, object_labels(classes, match[0]))
        seen.add(tuple(match[0].box))
    assert len(seen) == 3  # every object gets drawn


def test_box_iou_and_the_stage2_threshold():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.5, 0.0]])
    props = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9], [20, 20, 30, 30]], float)
    objects = np.array([[0, 0, 10, 10]], float)
    assert matching_proposals(props, objects, 0.5).tolist() == [True, True, False, False]
    assert matching_proposals(props, np.zeros((0, 4)), 0.5).tolist() == [False] * 4


def test_stage2_crops_are_proposals_overlapping_an_object_all_classes_labelled():
    sample = synthetic.sample(np.random.default_rng(3), 128, 128, 4)
    objs = find_instances(sample.classes, sample.objects)
    boxes = np.stack([o.box for o in objs])
    ds = _dataset_for(2)
    whole = np.array([0, 0, 128, 128], float)
    for seed in range(15):
        box, labels = ds.target(VocSample(sample.image, sample.classes, sample.objects), objs,
                                np.random.default_rng(seed))
        np.testing.assert_array_equal(labels, sample.classes)  # every class stays labelled
        proposal = box if np.array_equal(box, whole) else enlarge_boxes(box[None], 1 / 1.2)[0]
        assert box_iou(proposal[None], boxes).max() >= 0.5 - 1e-9, f"{proposal} overlaps no object enough"


def test_stage2_falls_back_to_an_object_box_when_no_proposal_fits():
    classes = np.zeros((200, 200), np.uint8)
    classes[100:104, 100:110] = 2  # far smaller than any grid window
    sample = VocSample(np.zeros((200, 200, 3), np.uint8), classes, None)
    objs = find_instances(classes, None)
    box, labels = _dataset_for(2).target(sample, objs, np.random.default_rng(0))
    np.testing.assert_allclose(box, enlarge_boxes(objs[0].box[None], 1.2)[0])
    np.testing.assert_array_equal(labels, classes)


def test_augmentation_shapes_padding_and_mirror_keep_image_and_labels_together():
    h, w = 60, 80
    image = torch.ones(3, h, w)
    image[:, :, w // 2:] = -1  # left half +1 (label 1), right half -1 (label 2)
    labels = torch.ones(h, w, dtype=torch.uint8)
    labels[:, w // 2:] = 2
    flips = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x, y = crop_and_augment(image, labels, np.array([0, 0, w, h]), 250, 224, rng)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert y.shape == (224, 224) and y.dtype == torch.int64
        away = (x[0].abs() > 0.99)  # away from the blended middle column
        assert torch.equal(y[away], torch.where(x[0][away] > 0, 1, 2))
        flips += int(y[:, 0].eq(2).all())
    assert 0 < flips < 12  # both mirrored and plain crops occur
    # A box that leaves the image: zeros outside, labelled ignore.
    x, y = crop_and_augment(image, labels, np.array([-w, 0, w, h]), 250, 224, np.random.default_rng(0),
                            mirror=False)
    assert (y[:, :100] == IGNORE_INDEX).all() and (x[:, :, :100] == 0).all()
    assert ((y[:, 120:] == 1) | (y[:, 120:] == 2)).all()


def test_no_weight_decay_on_biases_and_batchnorm():
    model = build_model(preset("tiny", num_classes=5))
    decay, no_decay = training.param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert id(m.weight) in ids and id(m.bias) in ids
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            assert id(m.bias) in ids
            assert id(m.weight) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = training.make_optimizer(model, config_for("paper", data="d", storage="s", name="n"))
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.01


def test_step_decay_restarts_at_each_stage():
    cfg = config_for("paper", data="d", storage="s", name="n", stage1_steps=30, stage2_steps=50,
                     lr_step=20, lr_gamma=0.1)
    assert [round(learning_rate(cfg, s), 6) for s in (0, 19, 20, 29, 30, 49, 50, 79)] == \
        [0.01, 0.01, 0.001, 0.001, 0.01, 0.01, 0.001, 0.0001]


def test_config_checks_and_the_tiny_recipe():
    cfg = config_for("tiny", data="d", storage="s", name="n", num_workers=2, micro_batch_size=4)
    assert (cfg.batch_size, cfg.micro_batch, cfg.accumulation) == (16, 4, 2)
    assert config_for("paper", data="d", storage="s", name="n").batch_size == 64
    for bad, message in (({"batch_size": 10, "num_workers": 4}, "split evenly"),
                         ({"micro_batch_size": 3}, "does not divide"), ({"micro_batch_size": 1}, "at least 2 crops"),
                         ({"lr": -1.0}, "--lr"), ({"stage1_steps": 0, "stage2_steps": 0}, "positive sum"),
                         ({"name": "a/b"}, "--name")):
        with pytest.raises(ValueError, match=message):
            config_for("paper", data="d", storage="s", **{"name": "n", **bad})
    assert "secret" not in repr(dataclasses.replace(cfg, storage_options={"secret": "hunter2"}))


def test_loss_ignores_the_ignore_label():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0
    target = torch.tensor([[[1, 1], [IGNORE_INDEX, IGNORE_INDEX]]])
    assert training.segmentation_loss(logits, target).item() < 1e-3
    assert training.segmentation_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX)).item() == 0.0


def test_stream_sampler_resumes_exactly_and_ranks_share_nothing():
    data = list(range(10))
    whole = list(islice(iter(training.StreamSampler(data, 2, 1, seed=0)), 23))
    resumed = list(islice(iter(training.StreamSampler(data, 2, 1, seed=0, start=7)), 16))
    assert resumed == whole[7:]
    other = list(islice(iter(training.StreamSampler(data, 2, 0, seed=0)), 5))
    assert {i for i, _ in other}.isdisjoint({i for i, _ in whole[:5]})  # one epoch split over ranks
    keys = [k for _, k in whole] + [k for _, k in other]
    assert len(set(keys)) == len(keys)  # every draw of every rank seeds its own crop


@pytest.fixture
def voc(tmp_path):
    synthetic.generate(str(tmp_path / "voc"), images=6, seed=1, size=64, val_fraction=0.34)
    cfg = config_for("tiny", data=str(tmp_path / "voc"), storage=str(tmp_path / "runs"), name="t",
                     num_workers=0, batch_size=2)
    return cfg


def test_crop_dataset_and_loader_give_batches(voc):
    model, info = training.initial_model(voc)
    train, val = training.open_voc(voc)
    assert len(train) == 4 and len(val) == 2 and not {i.id for i in train.items} & {i.id for i in val.items}
    for stage in (1, 2):
        x, y = next(training.crop_loader(CropDataset(train, stage, voc, info), voc, 0, 1, start=0))
        assert x.shape == (2, 3, 224, 224) and y.shape == (2, 224, 224)
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}


def test_checkpoint_round_trip_is_a_model_dir(voc, tmp_path):
    model, info = training.initial_model(voc)
    opt = training.make_optimizer(model, voc)
    train, _ = training.open_voc(voc)
    batch = next(training.crop_loader(CropDataset(train, 1, voc, info), voc, 0, 1, start=0))
    training.train_step(model, opt, [batch], 0.01, torch.device("cpu"))
    state = training.TrainState(step=1, log=[{"step": 1, "stage": 1, "lr": 0.01, "loss": 3.0}])
    d = str(tmp_path / "ckpt")
    training.save_checkpoint(d, model, info, opt, state)
    loaded, info2, state2, opt_state = training.load_checkpoint(d)
    assert state2 == state and info2.classes == info.classes
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = training.make_optimizer(loaded, voc)
    opt2.load_state_dict(opt_state)
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert before.keys() == after.keys()
    for i in before:
        assert torch.equal(before[i]["momentum_buffer"], after[i]["momentum_buffer"]), i
    assert load_model_dir(d)[1].config == info.config  # the segment job's loader reads it


def test_evaluate_counts_every_labelled_val_pixel(voc):
    model, info = training.initial_model(voc)
    _, val = training.open_voc(voc)
    from deconvnet.proposals import ProposalConfig

    cm = training.evaluate(model, val, info, ProposalConfig(max_proposals=2))
    assert isinstance(cm, ConfusionMatrix) and model.training  # train mode restored
    labelled = sum(int((val.load(i).classes != IGNORE_INDEX).sum()) for i in range(len(val)))
    assert cm.matrix.sum() == labelled
