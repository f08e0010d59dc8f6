import json

import pytest
import torch

from segpipe.errors import ConfigError, ModelError
from segpipe.models import build_network, create_artifact, load_artifact, save_artifact


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "fpn"
    create_artifact(str(d), "FPN", "resnet18", ["bg", "fg"], in_channels=4, seed=3)
    return d


def test_round_trip(art_dir):
    art = load_artifact(str(art_dir))
    assert art.spec.architecture == "FPN" and art.spec.in_channels == 4 and art.spec.classes == ["bg", "fg"]
    assert len(art.sha256) == 64
    net = art.network()
    with torch.inference_mode():
        assert net(torch.zeros(1, 4, 64, 64)).shape == (1, 2, 64, 64)
    # the weights are exactly the state_dict of smp.create_model(...)
    import segmentation_models_pytorch as smp

    ref = smp.create_model("FPN", encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=2)
    assert set(ref.state_dict()) == set(art.weights)


def test_seeded(tmp_path):
    a = create_artifact(str(tmp_path / "a"), "Unet", "resnet18", ["x", "y"], seed=1)
    create_artifact(str(tmp_path / "b"), "Unet", "resnet18", ["x", "y"], seed=1)
    assert a.in_channels == 3
    assert load_artifact(str(tmp_path / "a")).sha256 == load_artifact(str(tmp_path / "b")).sha256


def test_missing_files(tmp_path, art_dir):
    with pytest.raises(ModelError, match="model folder does not exist"):
        load_artifact(str(tmp_path / "nope"))
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ModelError, match="missing model.json"):
        load_artifact(str(d))
    (d / "model.json").write_text((art_dir / "model.json").read_text())
    with pytest.raises(ModelError, match="missing weights.safetensors"):
        load_artifact(str(d))
    (d / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_artifact(str(d))


def test_invalid_json(tmp_path, art_dir):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_artifact(str(d))
    spec = json.loads((art_dir / "model.json").read_text())
    spec["mean"] = [0.5]
    (d / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="mean has 1 values"):
        load_artifact(str(d))


def test_weights_that_do_not_fit(tmp_path, art_dir):
    art = load_artifact(str(art_dir))
    spec = art.spec.model_copy(update={"classes": ["a", "b", "c"]})
    save_artifact(str(tmp_path / "m"), spec, art.weights)
    with pytest.raises(ModelError, match=r"tensor 'segmentation_head.0.weight' has shape \(2, 128, 1, 1\)"):
        load_artifact(str(tmp_path / "m")).network()
    w = dict(art.weights)
    w.pop("encoder.conv1.weight")
    save_artifact(str(tmp_path / "m2"), art.spec, w)
    with pytest.raises(ModelError, match="lack tensor 'encoder.conv1.weight'"):
        load_artifact(str(tmp_path / "m2")).network()


def test_unknown_names_list_valid_ones():
    with pytest.raises(ConfigError, match="unknown architecture; valid: .*Unet.*FPN"):
        build_network("Unetz", "resnet18", 3, 2)
    with pytest.raises(ConfigError, match="unknown encoder; valid: resnet18, resnet34"):
        build_network("Unet", "resnet19", 3, 2)
