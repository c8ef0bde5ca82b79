"""The architecture as published: counts, shapes, switches, gradients."""

import pytest
import torch
import torch.nn.functional as F

from deconvnet.model import PRESETS, DeconvNet, FCN8s, count_parameters, macs_per_proposal, preset


def test_paper_preset_has_the_published_parameter_count():
    weights_and_biases, bn_affine = count_parameters(DeconvNet(PRESETS["paper"]))
    assert weights_and_biases == 251_772_245
    assert bn_affine == 33_408


def test_paper_preset_macs_per_proposal():
    assert macs_per_proposal(PRESETS["paper"]) == pytest.approx(32.7e9, rel=0.01)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DeconvNet(PRESETS["tiny"]).eval()


@pytest.mark.parametrize("size", [(224, 224), (320, 480), (64, 96), (32, 32)])
def test_logits_have_the_input_size(tiny, size):
    with torch.inference_mode():
        out = tiny(torch.randn(2, 3, *size))
    assert out.shape == (2, 21, *size)


@pytest.mark.parametrize("name", ["fcn8s-tiny"])
@pytest.mark.parametrize("size", [(224, 224), (320, 480), (37, 61)])
def test_fcn8s_logits_have_the_input_size(name, size):
    model = FCN8s(PRESETS[name]).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, *size)).shape == (1, 21, *size)


@pytest.mark.parametrize("size", [(225, 224), (224, 100), (16, 32)])
def test_sizes_not_multiple_of_32_are_a_clear_error(tiny, size):
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny(torch.randn(1, 3, *size))


def test_num_classes_and_width_are_free():
    model = DeconvNet(preset("tiny", num_classes=5, width=0.25)).eval()
    assert model.features[0].conv.out_channels == 16
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_decoder_mirrors_the_encoder_widths():
    m = DeconvNet(PRESETS["paper"])
    dec = [(l.conv.in_channels, l.conv.out_channels) for l in m.decoder]
    assert dec == [(512, 512)] * 3 + [(512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
                                      (256, 128), (128, 128), (128, 64), (64, 64), (64, 64)]
    assert (m.fc6.conv.kernel_size, m.fc6.conv.padding) == ((7, 7), (0, 0))
    assert m.fc7.conv.kernel_size == (1, 1)
    assert isinstance(m.deconv_fc6.conv, torch.nn.ConvTranspose2d) and m.deconv_fc6.conv.kernel_size == (7, 7)
    assert not any(isinstance(x, torch.nn.Dropout) for x in m.modules())


def test_unpooling_puts_values_back_at_the_switches(tiny):
    """Capture the pool1 switches and the input of the last unpool: each value of
    the unpooled map sits exactly where its max came from, zeros elsewhere."""
    captured = {}
    orig_pool, orig_unpool = F.max_pool2d, F.max_unpool2d

    def pool(*a, **k):
        out, idx = orig_pool(*a, **k)
        captured.setdefault("first_idx", idx)
        return out, idx

    def unpool(x, idx, *a, **k):
        out = orig_unpool(x, idx, *a, **k)
        captured["last"] = (x, idx, out)
        return out

    import deconvnet.model as mm
    mm.F.max_pool2d, mm.F.max_unpool2d = pool, unpool
    try:
        with torch.inference_mode():
            tiny(torch.randn(1, 3, 64, 64))
    finally:
        mm.F.max_pool2d, mm.F.max_unpool2d = orig_pool, orig_unpool
    x, idx, out = captured["last"]
    assert torch.equal(idx, captured["first_idx"])  # the last unpool uses pool1's switches
    n, c, h, w = out.shape
    flat = out.reshape(n, c, -1)
    assert torch.equal(flat.gather(2, idx.reshape(n, c, -1)), x.reshape(n, c, -1))
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx.reshape(n, c, -1), True)
    assert (flat[~mask] == 0).all()


def test_gradients_reach_the_first_conv():
    model = DeconvNet(PRESETS["tiny"]).train()
    x = torch.randn(2, 3, 224, 224)
    target = torch.randint(0, 21, (2, 224, 224))
    F.cross_entropy(model(x), target).backward()
    g = model.features[0].conv.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_decoder_initialisation_is_gaussian_001():
    m = DeconvNet(PRESETS["paper"])
    w = m.decoder[0].conv.weight
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert (m.decoder[0].conv.bias == 0).all() and (m.score.bias == 0).all()
