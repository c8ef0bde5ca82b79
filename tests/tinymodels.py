"""Tiny models for tests that need labels which mean something to compare."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deconvnet import storage
from deconvnet.data.imageio import decode_image
from deconvnet.data.voc import VOC_CLASSES
from deconvnet.model import build_model, preset
from deconvnet.weights import ModelInfo, save_model_dir


def varied_model(uri: str, data: str) -> None:
    """A random tiny DeconvNet for the generated classes whose labels vary over
    the image: BatchNorm statistics measured on the images themselves (He-normal
    weights with the initial statistics, or a few training steps, label every
    pixel with one class, which would make the comparison blind to where
    pixels land)."""
    torch.manual_seed(0)
    config = preset("tiny", num_classes=5)  # background + synthetic's 4 classes
    model, info = build_model(config), ModelInfo(config=config, classes=VOC_CLASSES[:5])
    images = [decode_image(storage.read_bytes(u)) for u in storage.list_files(f"{data}/JPEGImages")]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the one batch
    with torch.no_grad():
        model.train()(F.interpolate(x, size=224, mode="bilinear"))  # (N, 3, 224, 224)
    save_model_dir(model.eval(), uri, info)
