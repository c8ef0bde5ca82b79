"""DeconvNet (Noh, Hong, Han, ICCV 2015, arXiv 1505.04366) and its configuration.

The encoder is VGG16 (conv1_1..conv5_3, each 3x3/pad 1 + BatchNorm + ReLU) with
five 2x2/2 max pools that keep their indices (the "switches"); fc6 (7x7 conv),
fc7 (1x1) and deconv-fc6 (7x7 transposed conv) sit at the bottleneck; the
decoder walks the same layer table backwards: unpool with the matching switches,
then 3x3 transposed convs that mirror the encoder's convs. A 1x1 score layer
gives logits, (N, C, H, W) at the input's size.

Layout follows torchvision's `vgg.py`: the module, a `make_layers` helper, a
`cfgs` table in which "M" marks a max-pool. That table is the one statement of
the VGG16 layout: the encoder and the mirrored decoder are built from it, and
the foreign layouts are derived from it (torchvision's `features` indices in
`deconvnet.weights`, the Caffe layer names in `deconvnet.caffe.convert`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 ("D" in the VGG paper): each stage's 3x3 convs as (name, output
# channels), then "M", the stage's 2x2 max pool. The names are the Caffe releases'.
cfgs: dict[str, list[tuple[str, int] | str]] = {
    "D": [("conv1_1", 64), ("conv1_2", 64), "M",
          ("conv2_1", 128), ("conv2_2", 128), "M",
          ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
          ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
          ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "M"],
}


def vgg_stages(vgg: str = "D") -> list[list[tuple[str, int]]]:
    """The table's convs by stage, [(name, output channels), ...] each; a 2x2
    max pool ends every stage."""
    stages, stage = [], []
    for v in cfgs[vgg]:
        if v == "M":
            stages.append(stage)
            stage = []
        else:
            stage.append(v)
    assert not stage, f"cfgs[{vgg!r}] must end with a pool"
    return stages


@dataclass(frozen=True)
class DeconvNetConfig:
    """Architecture of a DeconvNet or FCN-8s model; what `config.json` records."""

    arch: str = "deconvnet"  # "deconvnet" or "fcn8s" (the EDeconvNet partner)
    num_classes: int = 21  # PASCAL VOC: 20 objects + background
    width: float = 1.0  # multiplier on VGG16's conv widths; 1.0 is the paper
    fc_dim: int = 4096  # fc6/fc7 width; 4096 in the paper (88% of the weights)
    fc_kernel: int = 7  # fc6 spans pool5's 7x7 at a 224x224 input
    batch_norm: bool = True  # DeconvNet needs BN to train; FCN-8s had none
    in_channels: int = 3  # RGB
    vgg: str = "D"  # key into `cfgs`

    def __post_init__(self):
        """Raise ValueError naming the field (a config.json can say anything)."""
        if self.arch not in ("deconvnet", "fcn8s"):
            raise ValueError(f"`arch` must be 'deconvnet' or 'fcn8s', got {self.arch!r}")
        if self.num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {self.num_classes}")
        if not (self.width > 0 and self.fc_dim >= 1 and self.fc_kernel >= 1 and self.in_channels >= 1):
            raise ValueError(f"`width`, `fc_dim`, `fc_kernel` and `in_channels` must be positive, got "
                             f"{self.width}, {self.fc_dim}, {self.fc_kernel}, {self.in_channels}")
        if self.vgg not in cfgs:
            raise ValueError(f"`vgg` must be one of {sorted(cfgs)}, got {self.vgg!r}")

    def stage_widths(self) -> list[list[int]]:
        """Each stage's conv widths, scaled by `width` (at least 1 channel)."""
        return [[max(1, round(c * self.width)) for _, c in stage] for stage in vgg_stages(self.vgg)]

    def layer_widths(self) -> list[int | str]:
        """The VGG table as widths, "M" where a pool is, scaled by `width`."""
        return [v for stage in self.stage_widths() for v in (*stage, "M")]

    @classmethod
    def from_dict(cls, d: dict) -> DeconvNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


PRESETS: dict[str, DeconvNetConfig] = {
    # The published network: 251,772,245 weights and biases + 33,408 BN affine.
    "paper": DeconvNetConfig(),
    # Same topology at 1/8 width and a 64-wide fc: forward+backward at 224x224
    # in a fraction of a second on 2 CPU cores, for tests and the demo.
    "tiny": DeconvNetConfig(width=0.125, fc_dim=64),
    # FCN-8s for the EDeconvNet ensemble (VGG16 without BN, as published).
    "fcn8s": DeconvNetConfig(arch="fcn8s", batch_norm=False),
    "fcn8s-tiny": DeconvNetConfig(arch="fcn8s", batch_norm=False, width=0.125, fc_dim=64),
}


def preset(name: str, **overrides) -> DeconvNetConfig:
    """A named preset, with any field overridden (e.g. `num_classes=5`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class ConvBNReLU(nn.Sequential):
    """conv -> BN (or identity) -> ReLU; `transposed` gives the decoder's deconv."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int,
                 batch_norm: bool = True, transposed: bool = False):
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        super().__init__()
        self.conv = conv_cls(cin, cout, kernel, padding=padding)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)


def make_layers(widths: list[int | str], in_channels: int, batch_norm: bool,
                transposed: bool = False) -> nn.ModuleList:
    """The 3x3 convs of a VGG table ("M" entries are pools, handled by the caller).

    With `transposed`, the table is walked backwards and each conv (cin -> cout)
    becomes a deconv (cout -> cin); the first conv's input (the image) is
    replaced by its own width, as in the paper (deconv1_1 is 64 -> 64).
    """
    pairs, cin = [], in_channels
    for v in widths:
        if v != "M":
            pairs.append((cin, v))
            cin = v
    if transposed:
        first_out = pairs[0][1]
        pairs = [(cout, cin if i > 0 else first_out) for i, (cin, cout) in enumerate(pairs)][::-1]
    return nn.ModuleList(ConvBNReLU(a, b, 3, 1, batch_norm, transposed) for a, b in pairs)


def check_input_size(x: torch.Tensor, multiple: int = 32) -> None:
    assert x.ndim == 4, f"expected (N, C, H, W), got shape {tuple(x.shape)}"
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(
            f"input height and width must be positive multiples of {multiple} "
            f"(five 2x2 pools), got {h}x{w}; resize or pad the image first")


class DeconvNet(nn.Module):
    """DeconvNet: logits (N, num_classes, H, W) for an input (N, 3, H, W), H and W
    multiples of 32.

    fc6 is a 7x7 conv without padding, as published: at 224x224 it maps pool5's
    7x7 to 1x1 and deconv-fc6 maps it back. For inputs whose pool5 is smaller
    than 7x7 (sides under 224), pool5 is zero-padded to 7x7 and the deconv-fc6
    output cropped back, so every multiple of 32 works.
    """

    def __init__(self, config: DeconvNetConfig = PRESETS["paper"]):
        super().__init__()
        assert config.arch == "deconvnet", f"DeconvNet needs arch='deconvnet', got {config.arch!r}"
        self.config = config
        widths, stages = config.layer_widths(), config.stage_widths()
        self.pool_after = _pool_positions(widths)  # conv indices followed by a pool
        c1, c5 = stages[0][0], stages[-1][-1]
        bn = config.batch_norm
        self.features = make_layers(widths, config.in_channels, bn)
        self.fc6 = ConvBNReLU(c5, config.fc_dim, config.fc_kernel, 0, bn)
        self.fc7 = ConvBNReLU(config.fc_dim, config.fc_dim, 1, 0, bn)
        self.deconv_fc6 = ConvBNReLU(config.fc_dim, c5, config.fc_kernel, 0, bn, transposed=True)
        self.decoder = make_layers(widths, config.in_channels, bn, transposed=True)
        self.score = nn.Conv2d(c1, config.num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' training initialisation (HyeonwooNoh/DeconvNet
        training/001_stage_1/stage_1_train.prototxt): decoder (fc6-deconv, deconvs,
        seg-score) Gaussian std 0.01 with zero biases, BN scale 1 and shift 0.001;
        the encoder as torchvision's VGG (He normal) until VGG16 weights are
        loaded into it (the release starts it from VGG_ILSVRC_16_layers_conv)."""
        for m in [*self.features.modules(), *self.fc6.modules(), *self.fc7.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in [*self.deconv_fc6.modules(), *self.decoder.modules(), *self.score.modules()]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x)
        switches: list[tuple[torch.Tensor, torch.Size]] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.pool_after:
                size = x.shape[-2:]
                x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
                switches.append((idx, size))
        # x: (N, c5, H/32, W/32)
        h5, w5 = x.shape[-2:]
        k = self.config.fc_kernel
        ph, pw = max(0, k - h5), max(0, k - w5)
        if ph or pw:  # small input: pad pool5 up to fc6's kernel, crop back below
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.deconv_fc6(self.fc7(self.fc6(x)))  # (N, c5, h5+ph, w5+pw)
        if ph or pw:
            x = x[..., ph // 2: ph // 2 + h5, pw // 2: pw // 2 + w5]
        n_conv = len(self.decoder)
        for j, layer in enumerate(self.decoder):
            if (n_conv - 1 - j) in self.pool_after:  # mirror of that conv's pool
                idx, size = switches.pop()
                x = F.max_unpool2d(x, idx, 2, 2, output_size=size)
            x = layer(x)
        return self.score(x)  # (N, num_classes, H, W)


def _pool_positions(widths: list[int | str]) -> frozenset[int]:
    """Indices (among convs) of the convs that a max-pool follows."""
    out, i = set(), -1
    for v in widths:
        if v == "M":
            out.add(i)
        else:
            i += 1
    return frozenset(out)


class FCN8s(nn.Module):
    """FCN-8s (Long, Shelhamer, Darrell, CVPR 2015) with DeconvNet's output
    contract: logits (N, num_classes, H, W) at the input's size, for any size.

    The crop/align arithmetic is that of the FCN authors' net (model/FCN/
    fcn-8s-pascal-deploy.prototxt in HyeonwooNoh/DeconvNet, whose CROP layers
    Caffe aligns at these offsets): conv1_1 pads by 100, fc6 is an
    unpadded 7x7 conv, score_fr is upsampled 2x and fused with score_pool4
    (cropped at offset 5), upsampled 2x and fused with score_pool3 (offset 9),
    then upsampled 8x and cropped at offset 31.
    """

    def __init__(self, config: DeconvNetConfig = PRESETS["fcn8s"]):
        super().__init__()
        assert config.arch == "fcn8s", f"FCN8s needs arch='fcn8s', got {config.arch!r}"
        self.config = config
        widths, stages = config.layer_widths(), config.stage_widths()
        self.pool_after = _pool_positions(widths)
        c3, c4, c5 = (stage[-1] for stage in stages[2:])  # pool3, pool4 and pool5's channels
        c, bn = config.num_classes, config.batch_norm
        self.features = make_layers(widths, config.in_channels, bn)
        self.features[0].conv.padding = (100, 100)
        self.fc6 = ConvBNReLU(c5, config.fc_dim, config.fc_kernel, 0, bn)
        self.fc7 = ConvBNReLU(config.fc_dim, config.fc_dim, 1, 0, bn)
        self.score_fr = nn.Conv2d(config.fc_dim, c, 1)
        self.score_pool4 = nn.Conv2d(c4, c, 1)
        self.score_pool3 = nn.Conv2d(c3, c, 1)
        # The release's score2 has a bias (model/FCN/fcn-8s-pascal-deploy.prototxt in
        # HyeonwooNoh/DeconvNet); score4 and upsample have none.
        self.upscore2 = nn.ConvTranspose2d(c, c, 4, stride=2)
        self.upscore_pool4 = nn.ConvTranspose2d(c, c, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(c, c, 16, stride=8, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Score layers zero, upsampling bilinear (the FCN authors' net surgery)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(m.weight)
        for m in (self.upscore2, self.upscore_pool4, self.upscore8):
            m.weight.data.copy_(bilinear_kernel(m.in_channels, m.kernel_size[0]))
        nn.init.zeros_(self.upscore2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, f"expected (N, C, H, W), got shape {tuple(x.shape)}"
        h, w = x.shape[-2:]
        inp = x
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)  # Caffe rounds pools up
                taps.append(x)
        pool3, pool4 = taps[2], taps[3]
        x = self.score_fr(self.fc7(self.fc6(x)))
        x = self.upscore2(x)  # (N, C, 2h5+2, ...)
        x = x + _crop(self.score_pool4(pool4), 5, x)
        x = self.upscore_pool4(x)
        x = x + _crop(self.score_pool3(pool3), 9, x)
        x = self.upscore8(x)
        out = x[..., 31: 31 + h, 31: 31 + w]
        assert out.shape[-2:] == inp.shape[-2:], f"FCN-8s crop gave {tuple(out.shape)} for {tuple(inp.shape)}"
        return out


def _crop(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    h, w = like.shape[-2:]
    return x[..., offset: offset + h, offset: offset + w]


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """(channels, channels, size, size) weights of a per-channel bilinear upsampler."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor  # (size,)
    filt = filt1d[:, None] * filt1d[None, :]
    w = torch.zeros(channels, channels, size, size)
    w[range(channels), range(channels)] = filt
    return w


def build_model(config: DeconvNetConfig) -> nn.Module:
    """The network a config describes (DeconvNet or FCN-8s)."""
    return {"deconvnet": DeconvNet, "fcn8s": FCN8s}[config.arch](config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(weights and biases of convs, BN affine parameters)."""
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return total - bn, bn


def macs_per_proposal(config: DeconvNetConfig, size: int = 224) -> int:
    """Multiply-accumulates of one forward at size x size (convs and deconvs)."""
    assert config.arch == "deconvnet", "MAC count is for DeconvNet"
    widths, macs, cin, s = config.layer_widths(), 0, config.in_channels, size
    convs = []
    for v in widths:
        if v == "M":
            s //= 2
        else:
            convs.append((cin, v, s))
            macs += cin * v * 9 * s * s
            cin = v
    k, s5 = config.fc_kernel, max(s, config.fc_kernel)
    o = s5 - k + 1
    macs += cin * config.fc_dim * k * k * o * o  # fc6
    macs += config.fc_dim * config.fc_dim * o * o  # fc7
    macs += config.fc_dim * cin * k * k * o * o  # deconv-fc6 (per input pixel)
    macs += sum(a * b * 9 * sz * sz for a, b, sz in convs)  # mirrored deconvs
    macs -= convs[0][0] * convs[0][1] * 9 * size * size  # deconv1_1 is 64->64, not 64->3
    macs += convs[0][1] * convs[0][1] * 9 * size * size
    macs += convs[0][1] * config.num_classes * size * size  # score
    return int(macs)


__all__ = [
    "DeconvNetConfig", "PRESETS", "preset", "DeconvNet", "FCN8s", "build_model",
    "make_layers", "cfgs", "vgg_stages", "count_parameters", "macs_per_proposal", "bilinear_kernel",
]
