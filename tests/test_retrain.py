"""A retrain round's bookkeeping: the margin it accepts, the inputs it records, what it registers."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from segpipe.core.errors import ConfigError


def test_a_negative_margin_is_refused_in_one_line_unless_allowed(tmp_path):
    """Defect: --margin -0.1 was accepted, so a typo could promote a worse model."""
    from click.testing import CliRunner

    from segpipe.cli.main import main
    from segpipe.core.settings import segment_settings
    from segpipe.evaluate.retrain import check_margin, retrain
    from segpipe.train.settings import train_settings

    reg = tmp_path / "reg"
    result = CliRunner().invoke(main, ["retrain", "--data", str(tmp_path / "data"), "--registry", str(reg),
                                       "--margin", "-0.1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: margin: -0.1 is below 0: it would promote a challenger up to 0.1 mean IoU worse than the champion; "
        "pass --allow-negative-margin (flow parameter allow_negative_margin=True) if that is meant"]
    with pytest.raises(ConfigError, match="is below 0"):
        retrain(str(tmp_path / "data"), str(reg), train_settings(), segment_settings(), margin=-0.1)
    assert not reg.exists()  # refused before anything was written
    check_margin(-0.1, allow_negative=True)
    check_margin(0.0)


class Stop(Exception):
    pass


@pytest.mark.slow
def test_a_round_records_its_inputs_as_they_were_when_it_started(tmp_path):
    """Defect: the skip fingerprint was taken at the end of a round, so labels saved during a long training
    matched it and next week's round was skipped. Also: a challenger bit-identical to the champion is not
    registered (it would be a second copy of the same weights)."""
    from segpipe.core.settings import segment_settings
    from segpipe.evaluate.retrain import retrain
    from segpipe.models.artifact import create_artifact, read_spec
    from segpipe.models.registry import list_versions
    from segpipe.train.loop import TrainResult
    from segpipe.train.settings import train_settings
    from segpipe.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", 3, 64, seed=2)
    artifact = tmp_path / "artifact"
    create_artifact(str(artifact), "Unet", "resnet18", read_spec_classes(data), in_channels=3, seed=0)
    sha = hashlib.sha256((artifact / "weights.safetensors").read_bytes()).hexdigest()
    mask = sorted((data / "masks").iterdir())[0]

    def train_step(data_uri: str, out: str, settings) -> TrainResult:
        shutil.copytree(artifact, out)
        st = mask.stat()
        os.utime(mask, (st.st_atime, st.st_mtime + 60))  # an annotator saves a mask while the round trains
        return TrainResult(uri=out, spec=read_spec(out), metrics={}, history=[], best_epoch=None, epochs_run=1,
                           stop_reason="completed", weights_sha256=sha, seconds=0.0)

    def stop(*_args) -> TrainResult:
        raise Stop

    reg = str(tmp_path / "reg")
    kw = dict(workdir=str(tmp_path / "runs"), skip_unchanged=True)
    tsettings, ssettings = train_settings(), segment_settings(chunk_size=64, halo=16, device="cpu", precision="fp32")
    first = retrain(str(data), reg, tsettings, ssettings, train_step=train_step, **kw)
    assert first.promoted and first.version == "v1"
    with pytest.raises(Stop):  # the mask saved during round 1 makes a new round: it trains
        retrain(str(data), reg, tsettings, ssettings, train_step=stop, **kw)
    # the same weights again: not registered, and the report says why
    same = retrain(str(data), reg, tsettings, ssettings, train_step=train_step, workdir=str(tmp_path / "runs"))
    assert not same.promoted and same.version == "v1" and "bit-identical to champion v1" in same.reason
    assert [v.version for v in list_versions(reg)] == ["v1"]
    assert not (Path(same.run) / "challenger" / "weights.safetensors").exists()  # the champion holds these bytes
    assert not (Path(first.run) / "challenger" / "weights.safetensors").exists()  # v1 holds them
    assert (Path(first.run) / "challenger" / "registered.json").exists()


def read_spec_classes(data: Path) -> list[str]:
    import json

    return [c["name"] for c in json.loads((data / "classes.json").read_text())["classes"]]


def test_rounds_started_in_the_same_second_get_run_folders_of_their_own(tmp_path, monkeypatch):
    """Defect (found by a CI run): the run folder was named by the second the round started, so a round
    started in the same second as the one before wrote into its folder (FileExistsError on the challenger)."""
    import datetime as dt

    from segpipe.core.settings import segment_settings
    from segpipe.evaluate import retrain as retrain_module
    from segpipe.models.artifact import create_artifact, read_spec
    from segpipe.train.loop import TrainResult
    from segpipe.train.settings import train_settings
    from segpipe.train.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", 3, 64, seed=2)
    artifact = tmp_path / "artifact"
    create_artifact(str(artifact), "Unet", "resnet18", read_spec_classes(data), in_channels=3, seed=0)
    sha = hashlib.sha256((artifact / "weights.safetensors").read_bytes()).hexdigest()

    def train_step(data_uri: str, out: str, settings) -> TrainResult:
        shutil.copytree(artifact, out)
        return TrainResult(uri=out, spec=read_spec(out), metrics={}, history=[], best_epoch=None, epochs_run=1,
                           stop_reason="completed", weights_sha256=sha, seconds=0.0)

    frozen = dt.datetime(2026, 12, 6, 6, 5, 18, tzinfo=dt.UTC)

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(retrain_module.dt, "datetime", Clock)
    runs = tmp_path / "runs"
    tsettings, ssettings = train_settings(), segment_settings(chunk_size=64, halo=16, device="cpu", precision="fp32")
    first = retrain_module.retrain(str(data), str(tmp_path / "reg"), tsettings, ssettings, train_step=train_step,
                                   workdir=str(runs), skip_unchanged=False)
    second = retrain_module.retrain(str(data), str(tmp_path / "reg"), tsettings, ssettings, train_step=train_step,
                                    workdir=str(runs), skip_unchanged=False)
    assert (Path(first.run).name, Path(second.run).name) == ("20261206T060518Z", "20261206T060518Z-2")
    assert sorted(p.name for p in runs.iterdir()) == ["20261206T060518Z", "20261206T060518Z-2"]
