"""A state dict in torchvision's `vgg16`/`vgg16_bn` layout, built from
`deconvnet.model.cfgs` the way torchvision builds the module: the VGG16 weights
users have, for tests of `weights.vgg16_to_deconvnet` and of the Caffe VGG16 import."""

from __future__ import annotations

from torch import nn

from deconvnet.model import DeconvNetConfig, cfgs


def torchvision_vgg16_state(width: float, fc_dim: int, batch_norm: bool) -> dict:
    """A state dict with torchvision's vgg16/vgg16_bn layout, built the way
    torchvision builds the module (features Sequential, classifier Linear)."""
    layers, cin = [], 3
    for v in cfgs["D"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            v = round(v[1] * width)  # (name, channels)
            layers += [nn.Conv2d(cin, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else []) + [nn.ReLU()]
            cin = v
    features = nn.Sequential(*layers)
    k = DeconvNetConfig().fc_kernel  # torchvision pools to 7x7 before the classifier
    classifier = nn.Sequential(nn.Linear(cin * k * k, fc_dim), nn.ReLU(), nn.Dropout(),
                               nn.Linear(fc_dim, fc_dim), nn.ReLU(), nn.Dropout(), nn.Linear(fc_dim, 1000))
    vgg = nn.Module()
    vgg.features, vgg.classifier = features, classifier
    for m in vgg.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
    return vgg.state_dict()
