"""Model directories (safetensors + config.json) and VGG16 initialisation."""

import json
import subprocess
import sys

import pytest
import torch
from torchvgg import torchvision_vgg16_state

from deconvnet import storage
from deconvnet.model import PRESETS, DeconvNet, FCN8s, preset
from deconvnet.weights import (
    ModelInfo, check_model_dir, init_from_vgg16, load_model_dir, read_model_info, read_state_dict,
    save_model_dir, torchvision_conv_indices, vgg16_to_deconvnet,
)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_weights_land_in_encoder_and_fc(batch_norm):
    cfg = PRESETS["tiny"]
    sd = torchvision_vgg16_state(cfg.width, cfg.fc_dim, batch_norm)
    model = DeconvNet(cfg)
    init_from_vgg16(model, sd)
    src_convs = [k[:-len(".weight")] for k, v in sd.items() if k.startswith("features.") and v.ndim == 4]
    assert len(src_convs) == 13
    assert tuple(int(k.split(".")[1]) for k in src_convs) == torchvision_conv_indices(batch_norm)
    for i, src in enumerate(src_convs):
        assert torch.equal(model.features[i].conv.weight, sd[f"{src}.weight"])
        assert torch.equal(model.features[i].conv.bias, sd[f"{src}.bias"])
    if batch_norm:
        bn_src = src_convs[12].split(".")[1]
        assert torch.equal(model.features[12].bn.running_var, sd[f"features.{int(bn_src) + 1}.running_var"])
    # fc6: Linear (fc, c5*7*7) reshaped to a 7x7 conv over pool5's channels.
    w6 = sd["classifier.0.weight"]
    assert torch.equal(model.fc6.conv.weight, w6.reshape(cfg.fc_dim, -1, 7, 7))
    assert torch.equal(model.fc6.conv.weight[3, 5, 2, 4], w6[3, 5 * 49 + 2 * 7 + 4])
    assert torch.equal(model.fc7.conv.weight[:, :, 0, 0], sd["classifier.3.weight"])
    assert torch.equal(model.fc7.conv.bias, sd["classifier.3.bias"])


def test_fc6_as_conv_computes_the_linear_layer():
    """On a 7x7 pool5 map, the converted fc6 conv equals VGG's Linear on the flattened map."""
    sd = torchvision_vgg16_state(0.125, 64, False)
    conv = vgg16_to_deconvnet(sd)
    x = torch.randn(2, 64, 7, 7)
    by_conv = torch.nn.functional.conv2d(x, conv["fc6.conv.weight"], conv["fc6.conv.bias"])[:, :, 0, 0]
    by_linear = torch.nn.functional.linear(x.flatten(1), sd["classifier.0.weight"], sd["classifier.0.bias"])
    torch.testing.assert_close(by_conv, by_linear, rtol=1e-4, atol=1e-4)


def test_vgg16_into_fcn8s():
    sd = torchvision_vgg16_state(0.125, 64, False)
    model = FCN8s(PRESETS["fcn8s-tiny"])
    init_from_vgg16(model, sd)
    assert torch.equal(model.features[0].conv.weight, sd["features.0.weight"])


def test_mismatched_vgg16_is_reported_by_name():
    sd = torchvision_vgg16_state(0.25, 64, False)  # wrong width for tiny
    with pytest.raises(ValueError, match=r"features\.0\.conv\.weight"):
        init_from_vgg16(DeconvNet(PRESETS["tiny"]), sd)
    sd = torchvision_vgg16_state(0.125, 64, False)
    del sd["features.28.bias"]
    with pytest.raises(ValueError, match=r"missing \['features\.12\.conv\.bias'\]"):
        init_from_vgg16(DeconvNet(PRESETS["tiny"]), sd)


def test_read_state_dict_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    sd = {"a": torch.randn(3, 2)}
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        assert torch.equal(read_state_dict(str(tmp_path / name))["a"], sd["a"])


def _trained_like(cfg):
    torch.manual_seed(1)
    m = DeconvNet(cfg).train()
    m(torch.randn(2, 3, 64, 64))  # moves BN running statistics off their defaults
    return m.eval()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_model_dir_round_trip_is_bit_exact(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(base, "models", "tiny")
    cfg = preset("tiny", num_classes=3)
    model = _trained_like(cfg)
    info = save_model_dir(model, uri, ModelInfo(config=cfg, classes=("background", "cat", "dog"),
                                                provenance={"note": "test"}))
    loaded, info2 = load_model_dir(uri)
    assert info2.model_id == info.model_id and info.model_id.startswith("deconvnet-")
    assert info2.classes == ("background", "cat", "dog") and info2.config == cfg
    assert info2.provenance["note"] == "test" and len(info2.provenance["sha256"]) == 64
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_model_id_follows_content(tmp_path):
    cfg = PRESETS["tiny"]
    m = _trained_like(cfg)
    id1 = save_model_dir(m, str(tmp_path / "a"), ModelInfo(config=cfg)).model_id
    id2 = save_model_dir(m, str(tmp_path / "b"), ModelInfo(config=cfg, provenance={"x": 1})).model_id
    with torch.no_grad():
        m.score.bias[0] += 1
    id3 = save_model_dir(m, str(tmp_path / "c"), ModelInfo(config=cfg)).model_id
    assert id1 == id2 != id3


# The loader and the cheap check a job runs before any image agree on every bad directory.
LOADERS = pytest.mark.parametrize("load", [load_model_dir, check_model_dir], ids=["load", "check"])


@LOADERS
def test_loader_refuses_pickles(tmp_path, load):
    cfg = PRESETS["tiny"]
    save_model_dir(DeconvNet(cfg), str(tmp_path), ModelInfo(config=cfg))
    (tmp_path / "model.safetensors").unlink()
    torch.save(DeconvNet(cfg).state_dict(), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        load(str(tmp_path))


@LOADERS
@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 0])
def test_truncated_safetensors_is_a_clear_error(tmp_path, load, keep):
    cfg = PRESETS["tiny"]
    save_model_dir(DeconvNet(cfg), str(tmp_path), ModelInfo(config=cfg))
    w = tmp_path / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        load(str(tmp_path))


@LOADERS
def test_config_that_does_not_match_weights_fails(tmp_path, load):
    cfg = PRESETS["tiny"]
    save_model_dir(DeconvNet(cfg), str(tmp_path), ModelInfo(config=cfg))
    c = json.loads((tmp_path / "config.json").read_text())
    c["architecture"]["fc_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"fc6\.conv\.weight"):
        load(str(tmp_path))


def test_check_passes_a_good_dir_on_s3_reading_only_the_header(s3_bucket):
    cfg = PRESETS["tiny"]
    info = save_model_dir(DeconvNet(cfg), f"{s3_bucket}/m", ModelInfo(config=cfg))
    assert check_model_dir(f"{s3_bucket}/m").model_id == info.model_id


def test_missing_model_dir_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m deconvnet init"):
        read_model_info(str(tmp_path / "nope"))


def test_init_cli_same_seed_same_model(tmp_path):
    ids = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        r = subprocess.run([sys.executable, "-m", "deconvnet", "init", "--out", str(tmp_path / name), "--seed", seed],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ids.append(read_model_info(str(tmp_path / name)).model_id)
    assert ids[0] == ids[1] != ids[2]


def test_init_cli_writes_a_loadable_dir(tmp_path):
    sd = torchvision_vgg16_state(0.125, 64, True)
    torch.save(sd, tmp_path / "vgg16_bn.pth")
    (tmp_path / "classes.txt").write_text("background\nshape\ntexture\n")
    out = tmp_path / "model"
    r = subprocess.run([sys.executable, "-m", "deconvnet", "init", "--preset", "tiny", "--out", str(out),
                        "--vgg16", str(tmp_path / "vgg16_bn.pth"), "--classes", str(tmp_path / "classes.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, info = load_model_dir(str(out))
    assert info.classes == ("background", "shape", "texture")
    assert "VGG16" in info.provenance["encoder_init"]
    assert torch.equal(model.features[0].conv.weight, sd["features.0.weight"])


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "invalid choice"),
    (["--vgg16", "/nonexistent/vgg.pth"], "no such file"),
])
def test_init_cli_user_mistakes_exit_2_without_traceback(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "deconvnet", "init", "--out", str(tmp_path / "m"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
