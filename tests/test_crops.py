"""deconvnet/training/crops.py: the two stages' crops and labels, augmentation, class
balance, the sample stream and the loader."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from deconvnet.data import synthetic
from deconvnet.training import crops, recipe
from deconvnet.training.crops import ANY_CLASS, CropDataset, class_balanced_entries, crop_and_augment, crop_loader
from deconvnet.data.geometry import box_iou, enlarge_boxes, find_instances, object_labels
from deconvnet.model import preset
from deconvnet.training.recipe import TrainConfig, config_for
from deconvnet.data.voc import IGNORE_INDEX, VocDataset, VocSample, open_train_val
from deconvnet.weights import ModelInfo
from test_geometry import scene


def _dataset_for(stage: int, cfg: TrainConfig | None = None) -> CropDataset:
    cfg = cfg or config_for("tiny", data="mem", storage="mem", name="t")
    info = ModelInfo(config=preset("tiny", num_classes=21))
    return CropDataset(VocDataset([]), stage, cfg, info)


def test_stage1_target_is_the_enlarged_box_of_one_object():
    classes, objects = scene()
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


def test_stream_sampler_resumes_exactly_and_ranks_share_nothing():
    data = list(range(10))
    whole = list(islice(iter(crops.StreamSampler(data, 2, 1, seed=0)), 23))
    resumed = list(islice(iter(crops.StreamSampler(data, 2, 1, seed=0, start=7)), 16))
    assert resumed == whole[7:]
    other = list(islice(iter(crops.StreamSampler(data, 2, 0, seed=0)), 5))
    assert {i for i, _ in other}.isdisjoint({i for i, _ in whole[:5]})  # one epoch split over ranks
    keys = [k for _, k in whole] + [k for _, k in other]
    assert len(set(keys)) == len(keys)  # every draw of every rank seeds its own crop


def test_crop_dataset_and_loader_give_batches(voc):
    model, info = recipe.initial_model(voc)
    train, val = open_train_val(voc.data, voc.extra_train_lists)
    assert len(train) == 4 and len(val) == 2 and not {i.id for i in train.items} & {i.id for i in val.items}
    for stage in (1, 2):
        x, y = next(crop_loader(CropDataset(train, stage, voc, info), voc, 0, 1, start=0))
        assert x.shape == (2, 3, 224, 224) and y.shape == (2, 224, 224)
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}


def test_class_balance_repeats_the_images_of_rare_classes():
    # Class 1 in 4 images, class 2 in 2, class 3 in 1; image 4 holds no object.
    present = [(1,), (1, 2), (1,), (1, 2, 3), ()]
    entries = class_balanced_entries(present)
    pairs = [tuple(e) for e in entries.tolist()]
    assert pairs.count((3, 3)) == 4 and pairs.count((1, 2)) == pairs.count((3, 2)) == 2
    assert all(pairs.count((i, 1)) == 1 for i in range(4))
    assert pairs.count((4, ANY_CLASS)) == 1
    per_class = {c: sum(1 for _, k in pairs if k == c) for c in (1, 2, 3)}
    assert per_class == {1: 4, 2: 4, 3: 4}  # every class drawn equally often
    assert class_balanced_entries([]).shape == (0, 2)


def test_stage1_entry_centres_on_an_object_of_its_class():
    classes, objects = scene()
    sample = VocSample(np.zeros((*classes.shape, 3), np.uint8), classes, objects)
    objs = find_instances(classes, objects)
    for seed in range(10):
        box, labels = _dataset_for(1).target(sample, objs, np.random.default_rng(seed), class_id=1)
        assert np.allclose(box, enlarge_boxes(np.array([[40, 25, 55, 35]], float), 1.2)[0])
        assert set(np.unique(labels)) == {0, 1, IGNORE_INDEX}


def test_classes_present_reads_every_label_map(voc):
    train, _ = open_train_val(voc.data, voc.extra_train_lists)
    found = train.classes_present(threads=2)
    assert found == [tuple(int(c) for c in np.unique(train.load(i).classes) if c not in (0, IGNORE_INDEX))
                     for i in range(len(train))]
    entries = class_balanced_entries(found)
    x, y = next(crop_loader(CropDataset(train, 1, voc, ModelInfo(config=preset("tiny", num_classes=21)),
                                        entries), voc, 0, 1, start=0))
    assert x.shape == (2, 3, 224, 224)
