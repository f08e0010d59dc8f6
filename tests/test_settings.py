"""segpipe.core.settings: unknown keys, field rules, the output key, the settings builder's errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segpipe.core.errors import ConfigError
from segpipe.core.settings import (
    ClusterSettings,
    InferenceSettings,
    OutputSettings,
    ReadSettings,
    SegmentSettings,
    TilingSettings,
    parse_bands,
    segment_settings,
)

# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (TilingSettings, {"chunk": 256}),
        (TilingSettings, {"chunk_size": 256, "tilesize": 768}),
        (ReadSettings, {"band": (1, 2)}),
        (InferenceSettings, {"devce": "cpu"}),
        (OutputSettings, {"zstd": 3}),
        (ClusterSettings, {"workers": 2}),
        (SegmentSettings, {"tilling": {}}),
    ],
)
def test_extra_keys_are_rejected(model, kwargs):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model(**kwargs)


def test_extra_keys_are_rejected_in_nested_dicts():
    with pytest.raises(ValidationError, match=r"tiling\.chnk_size"):
        SegmentSettings.model_validate({"tiling": {"chnk_size": 256}})
    # the right names validate
    s = SegmentSettings.model_validate({"tiling": {"chunk_size": 256}, "inference": {"device": "cpu"}})
    assert s.tiling.chunk_size == 256 and s.inference.device == "cpu"


def test_settings_are_frozen():
    s = TilingSettings()
    with pytest.raises(ValidationError):
        s.chunk_size = 128  # type: ignore[misc]


# ----------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(
    ("chunk", "tile", "ok"),
    [
        (256, None, True),
        (256, 256, True),
        (256, 768, True),
        (64, 4096, True),
        (256, 384, False),
        (256, 100, False),
        (512, 256, False),  # smaller than one chunk: not a multiple either
        (100, 150, False),
    ],
)
def test_tile_size_must_be_a_multiple_of_chunk_size(chunk, tile, ok):
    if ok:
        t = TilingSettings(chunk_size=chunk, tile_size=tile)
        assert t.tile == (tile if tile is not None else 2 * chunk)
    else:
        with pytest.raises(ValidationError, match=f"tile_size {tile} must be a multiple of chunk_size {chunk}"):
            TilingSettings(chunk_size=chunk, tile_size=tile)


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (TilingSettings, {"chunk_size": 15}),
        (TilingSettings, {"chunk_size": 16385}),
        (TilingSettings, {"halo": -1}),
        (TilingSettings, {"multiple_of": 0}),
        (ReadSettings, {"bands": ()}),
        (ReadSettings, {"bands": (0, 1)}),
        (ReadSettings, {"mpp": 0}),
        (InferenceSettings, {"device": "gpu"}),
        (InferenceSettings, {"device": "cuda:x"}),
        (InferenceSettings, {"precision": "fp8"}),
        (InferenceSettings, {"batch_size": 0}),
        (OutputSettings, {"zstd_level": 23}),
        (OutputSettings, {"background_class": -1}),
        (ClusterSettings, {"n_workers": 0}),
        (ClusterSettings, {"procs_per_device": 0}),
        (ClusterSettings, {"procs_per_device": 17}),
    ],
)
def test_bad_values_are_rejected(model, kwargs):
    with pytest.raises(ValidationError):
        model(**kwargs)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices(device):
    assert InferenceSettings(device=device).device == device


# ----------------------------------------------------------------------------- the output key

BASE = SegmentSettings()

#: one change per field of output_settings(); each must change the output key
PIXEL_CHANGES = {
    "chunk_size": {"tiling": TilingSettings(chunk_size=256, tile_size=1024)},  # the same tile (2 × 512)
    "halo": {"tiling": TilingSettings(halo=32)},
    "multiple_of": {"tiling": TilingSettings(multiple_of=64)},
    "tile_size": {"tiling": TilingSettings(tile_size=1536)},
    "bands": {"read": ReadSettings(bands=(3, 2, 1))},
    "level": {"read": ReadSettings(level=1)},
    "mpp": {"read": ReadSettings(mpp=0.5)},
    "gsd": {"read": ReadSettings(gsd=0.5)},
    "skip_empty": {"read": ReadSettings(skip_empty=False)},
    "tta": {"inference": InferenceSettings(tta=True)},
    "precision": {"inference": InferenceSettings(precision="bf16")},
    "runtime": {"inference": InferenceSettings(runtime="onnx")},
    "probabilities": {"inference": InferenceSettings(probabilities=True)},
    "background_class": {"output": OutputSettings(background_class=0)},
}

#: changes that never change output pixels; the output key must stay
RUN_CHANGES = {
    "device": {"inference": InferenceSettings(device="cpu")},
    "device cuda:1": {"inference": InferenceSettings(device="cuda:1")},
    "batch_size": {"inference": InferenceSettings(batch_size=7)},
    "overwrite": {"output": OutputSettings(overwrite=True)},
    "max_pixels": {"read": ReadSettings(max_pixels=1e6)},
}


def test_every_output_setting_is_covered():
    assert set(PIXEL_CHANGES) == set(BASE.output_settings())


@pytest.mark.parametrize("field", sorted(PIXEL_CHANGES))
def test_output_key_changes_with_each_output_setting(field):
    changed = BASE.model_copy(update=PIXEL_CHANGES[field])
    assert changed.output_settings()[field] != BASE.output_settings()[field]
    others = {k: v for k, v in changed.output_settings().items() if k != field}
    assert others == {k: v for k, v in BASE.output_settings().items() if k != field}  # only that field moved
    assert changed.output_key() != BASE.output_key()
    assert len(changed.output_key()) == 16 and int(changed.output_key(), 16) >= 0


def test_output_keys_of_all_changes_are_distinct():
    keys = {field: BASE.model_copy(update=u).output_key() for field, u in PIXEL_CHANGES.items()}
    assert len(set(keys.values()) | {BASE.output_key()}) == len(keys) + 1


@pytest.mark.parametrize("field", sorted(RUN_CHANGES))
def test_output_key_ignores_run_settings(field):
    changed = BASE.model_copy(update=RUN_CHANGES[field])
    assert changed != BASE
    assert changed.output_settings() == BASE.output_settings()
    assert changed.output_key() == BASE.output_key()


def test_output_key_is_stable_and_uses_the_effective_tile():
    assert SegmentSettings().output_key() == SegmentSettings().output_key()
    # the default tile (None) is 2 × chunk_size: the same output as asking for it explicitly
    a = SegmentSettings(tiling=TilingSettings(chunk_size=256))
    b = SegmentSettings(tiling=TilingSettings(chunk_size=256, tile_size=512))
    assert a.output_settings()["tile_size"] == 512 and a.output_key() == b.output_key()
    # the builder gives the same key as the models for the same values
    assert segment_settings(chunk_size=256, halo=32, device="cpu", batch_size=3).output_key() == \
        SegmentSettings(tiling=TilingSettings(chunk_size=256, halo=32)).output_key()


# ----------------------------------------------------------------------------- the builder: bands


@pytest.mark.parametrize(
    ("text", "bands"),
    [(None, None), ("", None), ("  ", None), ("1", (1,)), ("3,2,1", (3, 2, 1)), (" 1, 2 ,3 ", (1, 2, 3)),
     ("1,,2", (1, 2)), ("4,", (4,))],
)
def test_parse_bands(text, bands):
    assert parse_bands(text) == bands
    assert segment_settings(bands=text).read.bands == bands


@pytest.mark.parametrize("text", ["a", "1,b", "1.5", "1;2", "one,two", "1 2"])
def test_bands_that_are_not_integers_are_one_line_config_errors(text):
    with pytest.raises(ConfigError) as e:
        segment_settings(bands=text)
    assert isinstance(e.value, ConfigError)
    assert e.value.subject == "bands"
    assert str(e.value) == f"bands: takes comma-separated 1-based integers, got {text!r}"
    assert "\n" not in str(e.value)
    assert e.value.__suppress_context__  # raised "from None": no ValueError chained to the user's line


@pytest.mark.parametrize(("text", "message"), [("0,1", "bands are 1-based, got [0, 1]"),
                                               ("-1", "bands are 1-based, got [-1]"),
                                               (",", "bands must name at least one band")])
def test_bands_out_of_range(text, message):
    # integers that parse but are no band numbers are refused by ReadSettings' validator; its first
    # error is what the CLI prints as one line ("bands: Value error, ...", segpipe.cli.common)
    with pytest.raises(ValidationError) as e:
        segment_settings(bands=text)
    err = e.value.errors()[0]
    assert err["loc"] == ("bands",) and err["msg"] == f"Value error, {message}"
