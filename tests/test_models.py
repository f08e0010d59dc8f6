import json

import pytest
import torch

from segpipe.core.errors import ConfigError, ModelError
from segpipe.models.artifact import build_network, create_artifact, load_artifact, save_artifact


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
    # the weights are exactly the state_dict of build_network(...) (smp.create_model): the same
    # tensor names with the same shapes and dtypes, buffers (BatchNorm running stats, counters) included
    ref = build_network("FPN", "resnet18", 4, 2).state_dict()
    layout = lambda sd: {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}  # noqa: E731
    assert layout(art.weights) == layout(ref)
    assert art.weights["segmentation_head.0.weight"].shape == (2, 128, 1, 1)  # 2 classes
    assert art.weights["encoder.conv1.weight"].shape == (64, 4, 7, 7)  # 4 input bands
    assert art.weights["encoder.bn1.num_batches_tracked"].dtype == torch.int64
    # and the values are the network's: what was saved is what the loaded network holds
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], art.weights[k]) for k in ref)


def test_network_is_filled_by_its_weights_without_a_random_initialisation(tmp_path, art_dir):
    """The network is laid out on the meta device and filled by the weights: no random initialisation (the
    generator never moves for a 3-band Unet), the same network as an ordinary build given the same weights;
    the network check_model builds to validate the artifact is handed to the next network() call (a run
    builds it once)."""
    from segpipe.engine.job import check_model

    create_artifact(str(tmp_path / "unet"), "Unet", "resnet18", ["a", "b", "c"], seed=2)
    for path, bands in ((tmp_path / "unet", 3), (art_dir, 4)):
        art = load_artifact(str(path))
        ref = build_network(art.spec.architecture, "resnet18", bands, len(art.spec.classes))
        ref.load_state_dict(art.weights)
        ref.eval()
        state = torch.random.get_rng_state()
        net = art.network()
        if bands == 3:  # (smp patches a 4-band first conv with one small draw of its own)
            assert torch.equal(torch.random.get_rng_state(), state)  # nothing was initialised
        assert all(p.device.type == "cpu" and not p.is_meta for p in [*net.parameters(), *net.buffers()])
        x = torch.rand(2, bands, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.equal(net(x), ref(x))
        _, checked = check_model(str(path))
        kept = checked.network()
        assert kept is not checked.network()  # handed over once; the next call builds a new one
        with torch.inference_mode():
            assert torch.equal(kept(x), ref(x))


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


def _spec_json(art_dir, **changes):
    spec = json.loads((art_dir / "model.json").read_text())
    spec.update(changes)
    return json.dumps(spec)  # Python's json writes NaN / Infinity, as a careless exporter would


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"std": [float("nan")] * 4}, "std must hold finite numbers, got nan"),
        ({"mean": [float("inf")] * 4}, "mean must hold finite numbers, got inf"),
        ({"std": [0.2, 0.2, 0.0, 0.2]}, "std values must be positive"),
        ({"input_scale": 1e-300}, "input_scale must be a finite number between 1e-06 and 1e\\+12"),
        ({"input_scale": float("nan")}, "input_scale must be a finite number"),
        ({"input_scale": 1e300}, "input_scale must be a finite number"),
        ({"input_scale": 0}, "input_scale must be a finite number"),
        ({"input_scale": {"uint8": 255, "uint17": 3}}, "'uint17' is not a pixel type"),
        ({"input_dtype": "rgb"}, "'rgb' is not a pixel type"),
        ({"normalization": {"type": "zscore"}}, "normalization"),
        ({"normalization": {"type": "minmax", "min": [0], "max": [0]}}, "max must be greater than"),
        ({"normalization": {"type": "minmax", "min": [0, 0], "max": [1, 1]}}, "normalization.min has 2 values"),
        ({"normalization": {"type": "percentile", "low": 98, "high": 2}}, "0 <= low < high <= 100"),
        ({"normalization": {"type": "scale", "input_scale": 255, "typo": 1}}, "typo"),
    ],
)
def test_normalisation_numbers_are_validated(tmp_path, art_dir, changes, message):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.json").write_text(_spec_json(art_dir, **changes))
    (d / "weights.safetensors").write_bytes((art_dir / "weights.safetensors").read_bytes())
    with pytest.raises(ModelError, match=message) as e:
        load_artifact(str(d))
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, art_dir):
    art = load_artifact(str(art_dir))
    w = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in art.weights.items()}
    save_artifact(str(tmp_path / "nan"), art.spec, w)
    first = min(k for k, v in w.items() if v.is_floating_point())
    with pytest.raises(ModelError, match=f"tensor '{first}' holds .* NaN/infinite") as e:
        load_artifact(str(tmp_path / "nan"))
    assert "\n" not in str(e.value) and str(tmp_path / "nan") in str(e.value)
    w = dict(art.weights)
    w["decoder.p5.weight"] = w["decoder.p5.weight"].clone()
    w["decoder.p5.weight"].view(-1)[7] = float("inf")
    save_artifact(str(tmp_path / "inf"), art.spec, w)
    with pytest.raises(ModelError, match="tensor 'decoder.p5.weight' holds 1 NaN/infinite value"):
        load_artifact(str(tmp_path / "inf"))


def test_model_json_contract_is_kept(tmp_path, art_dir):
    data = json.loads((art_dir / "model.json").read_text())
    assert data["format"] == "segpipe-model/1" and data["input_scale"] == 255.0
    assert "input_dtype" not in data and "normalization" not in data  # optional keys: absent when unset
    # extra keys survive; the new optional keys round-trip
    data.update(version=7, notes={"by": "me"}, input_dtype="uint16", input_scale=65535,
                normalization={"type": "minmax", "min": [0], "max": [4095]})
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(data))
    (d / "weights.safetensors").write_bytes((art_dir / "weights.safetensors").read_bytes())
    art = load_artifact(str(d))
    assert art.spec.model_extra == {"version": 7, "notes": {"by": "me"}}
    save_artifact(str(tmp_path / "again"), art.spec, art.weights)
    again = json.loads((tmp_path / "again" / "model.json").read_text())
    assert again == {**data, "input_scale": 65535.0,
                     "normalization": {"type": "minmax", "min": [0.0], "max": [4095.0]}}
    core = art.spec.core()
    assert core["normalization"] == {"type": "minmax", "min": [0.0], "max": [4095.0]}
    json.dumps(core)  # provenance
