"""Caffe weights import: fixtures written in the release's own format (V1 layers,
the fork's BN 43 / DECONVOLUTION 39 / UNPOOLING 42, pools with mask tops), converted
back and checked against forwards written with Caffe's conventions on the blobs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

import caffenets
import caffewriter
from torchvgg import torchvision_vgg16_state
from deconvnet.caffe import convert as caffe
from deconvnet.caffe import proto as caffeproto
from deconvnet.__main__ import main
from deconvnet.model import DeconvNet, FCN8s, count_parameters, preset
from deconvnet.inference.segmenter import Segmenter, SegmenterConfig
from deconvnet.weights import init_from_vgg16, load_model_dir, serialize_state

CLASSES = ("background", "a", "b", "c", "d")
MEAN_BGR = torch.tensor([104.00698793, 116.66876762, 122.67891434], dtype=torch.float64).view(1, 3, 1, 1)


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Every tensor random (BN statistics too, variances positive), so no mapping
    mistake hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.numpy()
        elif k.endswith("running_var"):
            out[k] = (torch.rand(v.shape, generator=g) + 0.5).numpy()
        else:
            scale = 0.5 if k.endswith(("bias", "running_mean")) else (2.0 / max(1, v[0].numel())) ** 0.5
            out[k] = (torch.randn(v.shape, generator=g) * scale).numpy()
    return out


def _write(tmp_path, layers, name="net", fmt="v1", file="w.caffemodel"):
    path = tmp_path / file
    path.write_bytes(caffewriter.encode_caffemodel(layers, name, fmt))
    return path


# --- reference forwards: Caffe's conventions, straight on the blobs ----------

def _t(a):
    return torch.from_numpy(np.array(a, np.float64))


def caffe_deconvnet_forward(p, x):
    """The deploy prototxt layer by layer: conv/deconv + BN (scale * x + shift) + ReLU,
    2x2 max pools whose switches the unpools use; x is BGR minus the mean."""
    def conv(name, x, pad, transposed=False):
        w, b = p[name]
        f = F.conv_transpose2d if transposed else F.conv2d
        return f(x, _t(w), _t(b).reshape(-1), padding=pad)

    def bn_relu(name, x):
        s, t = p[name]
        return torch.relu(x * _t(s) + _t(t))

    masks = []
    for stage, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        for i in range(1, n + 1):
            x = bn_relu(f"bn{stage}_{i}", conv(f"conv{stage}_{i}", x, 1))
        masks.append(x.shape[-2:])
        x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        masks[-1] = (idx, masks[-1])
    x = bn_relu("bnfc6", conv("fc6", x, 0))
    x = bn_relu("bnfc7", conv("fc7", x, 0))
    x = bn_relu("fc6-deconv-bn", conv("fc6-deconv", x, 0, transposed=True))
    for stage, n in ((5, 3), (4, 3), (3, 3), (2, 2), (1, 2)):
        idx, size = masks.pop()
        x = F.max_unpool2d(x, idx, 2, 2, output_size=size)
        for i in range(1, n + 1):
            x = bn_relu(f"debn{stage}_{i}", conv(f"deconv{stage}_{i}", x, 1, transposed=True))
    return conv("seg-score-voc", x, 0)


def caffe_fcn8s_forward(p, x):
    """fcn-8s-pascal-deploy.prototxt: conv1_1 pads 100, pools round up, score2 has a
    bias; the crops sit at FCN-8s's offsets 5 (pool4), 9 (pool3) and 31 (output)."""
    h, w = x.shape[-2:]
    taps = []
    for stage, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        for i in range(1, n + 1):
            wt, b = p[f"conv{stage}_{i}"]
            x = torch.relu(F.conv2d(x, _t(wt), _t(b).reshape(-1), padding=100 if (stage, i) == (1, 1) else 1))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        taps.append(x)
    for name in ("fc6", "fc7"):
        x = torch.relu(F.conv2d(x, _t(p[name][0]), _t(p[name][1]).reshape(-1)))
    x = F.conv2d(x, _t(p["score-fr"][0]), _t(p["score-fr"][1]).reshape(-1))
    x = F.conv_transpose2d(x, _t(p["score2"][0]), _t(p["score2"][1]).reshape(-1), stride=2)
    s4 = F.conv2d(taps[3], _t(p["score-pool4"][0]), _t(p["score-pool4"][1]).reshape(-1))
    x = x + s4[..., 5:5 + x.shape[-2], 5:5 + x.shape[-1]]
    x = F.conv_transpose2d(x, _t(p["score4"][0]), stride=2)
    s3 = F.conv2d(taps[2], _t(p["score-pool3"][0]), _t(p["score-pool3"][1]).reshape(-1))
    x = x + s3[..., 9:9 + x.shape[-2], 9:9 + x.shape[-1]]
    x = F.conv_transpose2d(x, _t(p["upsample"][0]), stride=8)
    return x[..., 31:31 + h, 31:31 + w]


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # RGB


def _caffe_input(rgb):
    bgr = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1)[None].double()
    return bgr - MEAN_BGR  # (1, 3, H, W), BGR, 0..255 minus the mean, no scaling


def _our_input(rgb, info):
    """What every consumer does with a model dir (the segmenter's normalisation, in
    float64 here: in float32 a near-tie in a max pool can move a switch, and the
    unpooled map then differs by a whole value at that pixel)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).double()
    mean = torch.tensor(info.mean, dtype=torch.float64).view(3, 1, 1) * 255
    std = torch.tensor(info.std, dtype=torch.float64).view(3, 1, 1) * 255
    return ((x - mean) / std)[None]


def _double(model):
    """The model in float64, BN's running_var = 1 - eps in float64 too. The file's
    float32 1 - eps makes sqrt(var + eps) exactly 1 in float32 (checked below),
    but not in float64, and a 1e-8 change can move a pool switch on a near-tie."""
    model.double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.running_var == np.float32(1 - m.eps)) and not m.running_mean.any()
            m.running_var.fill_(1 - m.eps)
    return model


@pytest.fixture(scope="module")
def tiny_params():
    """A tiny DeconvNet's weights as the release's blobs (BN folded)."""
    cfg = preset("tiny", num_classes=5)
    return caffenets.deconvnet_to_caffe(_random_state(DeconvNet(cfg), 0))


# --- DeconvNet ---------------------------------------------------------------

# The two ways an inference file says its BN is folded: bn_mode INFERENCE (the
# deploy prototxt), or the -mean/-var tops of the net BN_make_INFERENCE_script.py saved.
@pytest.mark.parametrize("marked_by", ["bn_mode", "stats_tops"])
def test_inference_file_gives_the_caffe_logits(tmp_path, tiny_params, marked_by):
    layers = (caffenets.deconvnet_layers(tiny_params, bn_mode="INFERENCE") if marked_by == "bn_mode" else
              caffenets.deconvnet_layers(tiny_params, bn_mode=None, stats_tops=True))
    assert {la.type for la in layers} >= {"BN", "DECONVOLUTION", "UNPOOLING", "POOLING"}
    assert all(not la.blobs for la in layers if la.type in ("UNPOOLING", "POOLING", "RELU"))
    src = _write(tmp_path, layers)
    done = caffe.convert_caffemodel(str(src), str(tmp_path / "m"), classes=CLASSES)
    assert (done.kind, done.bn_mode) == ("deconvnet", "inference")
    model, info = load_model_dir(str(tmp_path / "m"))
    _double(model)
    assert info.config == preset("tiny", num_classes=5) and info.classes == CLASSES
    assert "BGR" in info.provenance["input_convention"] and info.provenance["bn_mode"] == "inference"
    rgb = _image(224, 224)
    with torch.inference_mode():
        ours = model(_our_input(rgb, info))
        ref = caffe_deconvnet_forward(tiny_params, _caffe_input(rgb))
    assert ref.abs().max() > 1  # the check below is not about zeros
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_converted_bn_is_scale_and_shift_exactly(tmp_path, tiny_params):
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params))
    caffe.convert_caffemodel(str(src), str(tmp_path / "m"), classes=CLASSES)
    model, _ = load_model_dir(str(tmp_path / "m"))
    bn = model.decoder[4].bn  # debn4_2
    scale, shift = (_t(a).float().reshape(-1) for a in tiny_params["debn4_2"])
    x = torch.randn(2, bn.num_features, 5, 5)
    with torch.inference_mode():
        assert torch.equal(bn(x), torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)))


def test_segmenter_through_converted_model_matches_caffe(tmp_path, tiny_params):
    """End to end through the segmenter: one box covering a 224x224 image."""
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params))
    caffe.convert_caffemodel(str(src), str(tmp_path / "m"), classes=CLASSES)
    seg = Segmenter.from_model_dir(str(tmp_path / "m"), SegmenterConfig(dtype="fp32"), device="cpu")
    rgb = _image(224, 224, seed=3)
    probs = seg.probabilities([rgb], [np.array([[0, 0, 224, 224]])])[0]
    with torch.inference_mode():
        ref = caffe_deconvnet_forward(tiny_params, _caffe_input(rgb)).softmax(1)[0].numpy()
    # float32: a few pixels differ where a pool's near-tie moved a switch (see _our_input);
    # a wrong channel order or mean changes nearly every pixel.
    same = np.abs(probs - ref).max(0) < 1e-3
    assert same.mean() > 0.97, same.mean()


def test_training_snapshot_keeps_gamma_beta_and_says_it_is_for_fine_tuning(tmp_path, tiny_params):
    # The stage_1/stage_2 training prototxts: bn_param without bn_mode (LEARN), one top.
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params, bn_mode="LEARN"), name="stage_2_train")
    out = tmp_path / "m"
    assert main(["convert-caffe", str(src), "--out", str(out), "--classes", str(_classes_file(tmp_path))]) == 0
    model, info = load_model_dir(str(out))
    assert info.provenance["bn_mode"] == "learn" and "fine-tuning" in info.provenance["bn"]
    assert torch.equal(model.features[3].bn.weight, _t(tiny_params["bn2_2"][0]).float().reshape(-1))
    assert torch.equal(model.features[3].bn.running_mean, torch.zeros(16))
    assert torch.equal(model.features[3].bn.running_var, torch.ones(16))


def test_cli_prints_what_it_wrote_and_the_fine_tuning_note(tmp_path, tiny_params, capsys):
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params, bn_mode="LEARN"))
    assert main(["convert-caffe", str(src), "--out", str(tmp_path / "m"),
                 "--classes", str(_classes_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    n, _ = count_parameters(DeconvNet(preset("tiny", num_classes=5)))
    assert "kind deconvnet" in out and "5 classes" in out and f"{n:,} weights and biases" in out
    assert "model id deconvnet-" in out and "jobs/train.py --init" in out


def test_new_layer_format_with_shape_blobs(tmp_path, tiny_params):
    """`layer` (field 100) has no bn_param of the fork's: the mode must be named."""
    new_style = {k: [b.reshape(-1) if b.shape[:3] == (1, 1, 1) else b for b in v] for k, v in tiny_params.items()}
    src = _write(tmp_path, caffenets.deconvnet_layers(new_style), fmt="layer")  # biases (C,), as newer Caffe
    net = caffeproto.read_caffemodel(str(src))
    assert net.format == "layer (field 100)" and net.params()["conv1_1"][1].shape == (8,)
    with pytest.raises(ValueError, match="`bn_mode`"):
        caffe.convert(net, classes=CLASSES)
    caffe.convert_caffemodel(str(src), str(tmp_path / "m"), classes=CLASSES, bn_mode="inference")
    model, info = load_model_dir(str(tmp_path / "m"))
    _double(model)
    rgb = _image(224, 224, seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(model(_our_input(rgb, info)),
                                   caffe_deconvnet_forward(tiny_params, _caffe_input(rgb)), rtol=1e-4, atol=1e-4)


def test_layer_names_are_the_releases():
    """Derived from model.cfgs; written out here as the prototxts spell them."""
    assert caffe.VGG_CONVS == ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
    assert caffe.DECONVS == ("deconv5_1", "deconv5_2", "deconv5_3", "deconv4_1", "deconv4_2", "deconv4_3",
                             "deconv3_1", "deconv3_2", "deconv3_3", "deconv2_1", "deconv2_2", "deconv1_1",
                             "deconv1_2")
    bns = [e.bn_layer for e in caffe.DECONVNET_TABLE]
    assert bns[:2] == ["bn1_1", "bn1_2"] and bns[13:18] == ["bnfc6", "bnfc7", "fc6-deconv-bn", "debn5_1", "debn5_2"]
    pools = [la for la in caffenets.deconvnet_layers(caffenets.deconvnet_to_caffe(
        _random_state(DeconvNet(preset("tiny")), 0))) if la.type in ("POOLING", "UNPOOLING")]
    assert [(la.name, la.bottoms[0]) for la in pools] == [
        ("pool1", "conv1_2"), ("pool2", "conv2_2"), ("pool3", "conv3_3"), ("pool4", "conv4_3"), ("pool5", "conv5_3"),
        ("unpool5", "fc6-deconv"), ("unpool4", "deconv5_3"), ("unpool3", "deconv4_3"), ("unpool2", "deconv3_3"),
        ("unpool1", "deconv2_2")]


def test_mapping_round_trips_and_reads_the_width_from_the_blobs():
    cfg = preset("tiny", num_classes=7, width=0.25, fc_dim=32)
    sd = _random_state(DeconvNet(cfg), 5)
    back = caffe.deconvnet_from_caffe(caffenets.deconvnet_to_caffe(sd, "learn"), "learn")
    for k in sd:
        if not k.endswith(("running_mean", "running_var")):
            assert np.array_equal(back[k], sd[k]), k
    layers = caffenets.deconvnet_layers(caffenets.deconvnet_to_caffe(sd), bn_mode="INFERENCE")
    net = caffeproto.parse_caffemodel(caffewriter.encode_caffemodel(layers))
    assert caffe.convert(net, classes=[str(i) for i in range(7)]).info.config == cfg


# --- FCN-8s ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v1", "layer"])
def test_fcn8s_gives_the_caffe_logits(tmp_path, fmt):
    cfg = preset("fcn8s-tiny", num_classes=5)
    params = caffenets.fcn8s_to_caffe(_random_state(FCN8s(cfg), 2))
    assert params["score2"][1].any() and len(params["score4"]) == len(params["upsample"]) == 1
    src = _write(tmp_path, caffenets.fcn8s_layers(params), name="FCN", fmt=fmt)
    done = caffe.convert_caffemodel(str(src), str(tmp_path / "m"), classes=CLASSES)
    assert done.kind == "fcn8s" and done.bn_mode is None
    model, info = load_model_dir(str(tmp_path / "m"))
    _double(model)
    assert info.config == cfg
    rgb = _image(70, 90, seed=2)
    with torch.inference_mode():
        torch.testing.assert_close(model(_our_input(rgb, info)), caffe_fcn8s_forward(params, _caffe_input(rgb)),
                                   rtol=1e-4, atol=1e-4)


# --- VGG16 -------------------------------------------------------------------

@pytest.mark.parametrize("fc", ["inner_product", "conv"])  # VGG_ILSVRC_16_layers / _conv
def test_vgg16_lands_where_init_vgg16_puts_it(tmp_path, fc):
    tv = torchvision_vgg16_state(0.125, 64, batch_norm=False)
    params = caffenets.vgg16_to_caffe({k: v.numpy() for k, v in tv.items()}, fc=fc)
    params["fc8"] = [np.ones((1, 1, 10, 64), np.float32), np.zeros((1, 1, 1, 10), np.float32)]
    layers = caffenets.vgg16_layers(params)
    assert [la.type for la in layers if la.name == "fc6"] == ["INNER_PRODUCT" if fc == "inner_product" else "CONVOLUTION"]
    src = _write(tmp_path, layers, name="VGG_ILSVRC_16_layers")
    done = caffe.convert_caffemodel(str(src), str(tmp_path / "m"))
    assert done.kind == "vgg16"
    model, info = load_model_dir(str(tmp_path / "m"))
    # `init --preset tiny --seed 0 --vgg16` with the same weights, conv1_1 taking RGB.
    torch.manual_seed(0)
    ref = DeconvNet(preset("tiny"))
    init_from_vgg16(ref, {**tv, "features.0.weight": tv["features.0.weight"].flip(1)})
    assert info.config == ref.config
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert info.mean == caffe.CAFFE_MEAN_RGB01 and "VGG16" in info.provenance["encoder_init"]


# --- bad input: one line, exit 2, nothing written ----------------------------

def _classes_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def _bad_files(params):
    good = caffewriter.encode_caffemodel(caffenets.deconvnet_layers(params))
    missing = [la for la in caffenets.deconvnet_layers(params) if la.name != "deconv3_2"]
    wrong = {**params, "deconv3_2": [np.zeros((32, 16, 3, 3), np.float32), params["deconv3_2"][1]]}
    return {
        "truncated-half": (good[: len(good) // 2], "truncated or not a Caffe model"),
        "truncated-end": (good[:-3], "truncated or not a Caffe model"),
        "garbage": (np.random.default_rng(0).bytes(5000), "not a Caffe model"),
        "empty": (b"", "empty file"),
        "missing-layer": (caffewriter.encode_caffemodel(missing), "missing layer 'deconv3_2'"),
        "wrong-shape": (caffewriter.encode_caffemodel(caffenets.deconvnet_layers(wrong)), r"deconv3_2 \(32, 16, 3, 3\)"),
    }


@pytest.mark.parametrize("case", ["truncated-half", "truncated-end", "garbage", "empty", "missing-layer",
                                  "wrong-shape"])
def test_bad_files_fail_with_one_line_and_write_nothing(tmp_path, tiny_params, capsys, case):
    raw, message = _bad_files(tiny_params)[case]
    src = tmp_path / "bad.caffemodel"
    src.write_bytes(raw)
    out = tmp_path / "m"
    assert main(["convert-caffe", str(src), "--out", str(out), "--classes", str(_classes_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_file_and_unnamed_classes_fail_in_one_line(tmp_path, tiny_params, capsys):
    assert main(["convert-caffe", str(tmp_path / "nope.caffemodel"), "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params))
    assert main(["convert-caffe", str(src), "--out", str(tmp_path / "m")]) == 2  # 5 classes, no --classes
    err = capsys.readouterr().err
    assert "--classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_cli_runs_as_a_module(tmp_path, tiny_params):
    src = _write(tmp_path, caffenets.deconvnet_layers(tiny_params))
    r = subprocess.run([sys.executable, "-m", "deconvnet", "convert-caffe", str(src), "--out", str(tmp_path / "m"),
                        "--classes", str(_classes_file(tmp_path))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["provenance"]["kind"] == "deconvnet" and cfg["model_id"] in r.stdout


# --- the state-dict writer ---------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "fcn8s-tiny"])
def test_writer_is_byte_identical_to_safetensors_so_model_ids_stay(name):
    model = (FCN8s if name.startswith("fcn") else DeconvNet)(preset(name))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert bytes(serialize_state(state)) == st_save(state)
    as_numpy = {k: v.numpy() for k, v in state.items()}
    assert bytes(serialize_state(as_numpy)) == st_save(state)


# --- the published file (opt-in) ---------------------------------------------

@pytest.mark.skipif(not os.environ.get("DECONVNET_CAFFEMODEL"),
                    reason="set DECONVNET_CAFFEMODEL to DeconvNet_trainval_inference.caffemodel")
def test_published_inference_model_converts(tmp_path):
    done = caffe.convert_caffemodel(os.environ["DECONVNET_CAFFEMODEL"], str(tmp_path / "m"))
    assert (done.kind, done.bn_mode) == ("deconvnet", "inference")
    model, info = load_model_dir(str(tmp_path / "m"))
    assert count_parameters(model) == (251_772_245, 33_408)
    _double(model)
    with torch.inference_mode():
        assert torch.isfinite(model(_our_input(_image(224, 224), info))).all()
