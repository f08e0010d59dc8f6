"""Model registry: immutable versions, an atomic champion pointer, and what --model resolves to."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import fsspec
import pytest

from segpipe.core.errors import ModelError
from segpipe.models import registry
from segpipe.models.artifact import create_artifact, load_artifact

METRICS = {"classes": ["bg", "fg"], "confusion_matrix": [[5, 1], [2, 4]], "per_class": {}, "mean_iou": 0.61,
           "frequency_weighted_iou": 0.6, "pixel_accuracy": 0.75}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("artifacts")
    a, b = str(d / "a"), str(d / "b")
    create_artifact(a, "FPN", "resnet18", ["bg", "fg"], in_channels=3, seed=1)
    create_artifact(b, "FPN", "resnet18", ["bg", "fg"], in_channels=3, seed=2)
    return a, b


def test_register_list_promote(artifacts, tmp_path):
    a, b = artifacts
    reg = str(tmp_path / "reg")
    assert not registry.is_registry(reg)
    assert registry.register(reg, a) == "v1"  # a missing registry is initialised
    assert registry.is_registry(reg)
    assert json.loads(Path(reg, "registry.json").read_text())["format"] == "segpipe-registry/1"
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# v2\n")
    assert registry.register(reg, b, metrics=METRICS, report_dir=str(report)) == "v2"
    assert sorted(os.listdir(Path(reg, "v2"))) == ["metrics.json", "mlm.json", "model.json", "registration.json",
                                                   "report.md", "weights.safetensors"]

    versions = registry.list_versions(reg)
    assert [v.version for v in versions] == ["v1", "v2"]
    v1, v2 = versions
    assert (v1.architecture, v1.encoder, v1.classes) == ("FPN", "resnet18", ["bg", "fg"])
    assert v1.weights_sha256 == load_artifact(a).sha256 and v2.weights_sha256 == load_artifact(b).sha256
    assert v1.val_mean_iou is None and v2.val_mean_iou == 0.61
    assert v1.created and not v1.is_champion and not v2.is_champion
    assert registry.champion(reg) is None

    pointer = registry.promote(reg, "v2", reason="better mIoU")
    assert pointer["version"] == "v2" and pointer["reason"] == "better mIoU" and pointer["previous"] is None
    assert registry.champion(reg) == "v2"
    assert [v.is_champion for v in registry.list_versions(reg)] == [False, True]
    registry.promote(reg, "v1", reason="rollback")
    assert registry.champion(reg) == "v1"
    assert [(h["version"], h["previous"]) for h in registry.history(reg)] == [("v2", None), ("v1", "v2")]
    with pytest.raises(ModelError, match=r"reg@v9: no such version; available: v1, v2"):
        registry.promote(reg, "v9")


def test_resolve(artifacts, tmp_path):
    a, b = artifacts
    reg = str(tmp_path / "reg")
    registry.init_registry(reg)
    assert registry.resolve(a) == a  # an artifact folder as is
    with pytest.raises(ModelError, match=r"reg: registry has no champion yet"):
        registry.resolve(reg)
    with pytest.raises(ModelError, match=r"reg@v1: no such version; the registry holds no versions yet"):
        registry.resolve(f"{reg}@v1")
    registry.register(reg, a)
    registry.register(reg, b)
    assert registry.resolve(f"{reg}@v2") == f"{reg}/v2"
    with pytest.raises(ModelError, match=r"reg@v7: no such version; available: v1, v2"):
        registry.resolve(f"{reg}@v7")
    registry.promote(reg, "v1")
    assert registry.resolve(reg) == f"{reg}/v1"
    # models.load_artifact goes through resolve: registry → champion, REG@vN → that version
    assert load_artifact(registry.resolve(reg)).sha256 == load_artifact(a).sha256
    assert load_artifact(registry.resolve(f"{reg}@v2")).sha256 == load_artifact(b).sha256
    assert registry.resolve(f"file://{reg}@v2") == f"{reg}/v2"
    # only a final @v<digits> selects a version; an artifact folder whose name ends so is itself
    odd = tmp_path / "model@v3"
    create_artifact(str(odd), "FPN", "resnet18", ["bg", "fg"], seed=1)
    assert registry.resolve(str(odd)) == str(odd)
    assert registry.resolve(str(tmp_path / "x@beta")) == str(tmp_path / "x@beta")  # left for the loader
    with pytest.raises(ModelError, match=r"is not a model registry \(asked for version v1\)"):
        registry.resolve(str(tmp_path / "nothing@v1"))


def test_versions_are_immutable(artifacts, tmp_path):
    a, b = artifacts
    reg = str(tmp_path / "reg")
    registry.register(reg, a)
    before = Path(reg, "v1", "weights.safetensors").read_bytes()
    # an interrupted registration (folder claimed, never completed) is skipped and never reused
    os.mkdir(Path(reg, "v2"))
    assert registry.register(reg, b) == "v3"
    assert Path(reg, "v1", "weights.safetensors").read_bytes() == before
    assert [v.version for v in registry.list_versions(reg)] == ["v1", "v3"]
    with pytest.raises(ModelError, match="no such version"):
        registry.resolve(f"{reg}@v2")
    # every file of a version is read-only: no write bit for anyone (checked on the mode bits, which
    # holds whoever runs the tests; that a write is then refused is test_version_files_refuse_writes)
    files = sorted(p.name for p in Path(reg, "v1").iterdir())
    assert files == ["mlm.json", "model.json", "registration.json", "weights.safetensors"]
    assert {name: oct(Path(reg, "v1", name).stat().st_mode & 0o777) for name in files} == dict.fromkeys(files, "0o444")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: root may write to a 0o444 file, so a refused write cannot be "
                           "observed here (the mode bits are checked in test_versions_are_immutable)")
def test_version_files_refuse_writes(artifacts, tmp_path):
    a, _ = artifacts
    reg = str(tmp_path / "reg")
    registry.register(reg, a, metrics=METRICS)
    for p in sorted(Path(reg, "v1").iterdir()):
        assert not os.access(p, os.W_OK), p.name
        with pytest.raises(PermissionError):
            p.open("r+b")
        with pytest.raises(PermissionError):
            p.write_bytes(b"tampered")
    assert registry.list_versions(reg)[0].weights_sha256 == load_artifact(a).sha256


def test_concurrent_registrations_get_distinct_versions(artifacts, tmp_path):
    a, _ = artifacts
    reg = str(tmp_path / "reg")
    registry.init_registry(reg)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(registry.register(reg, a))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ["v1", "v2", "v3", "v4"]


def test_champion_pointer_is_never_half_written(artifacts, tmp_path):
    a, _ = artifacts
    reg = str(tmp_path / "reg")
    for _ in range(3):
        registry.register(reg, a)
    # a crash between writing the temporary file and the rename leaves a stray tmp file behind
    Path(reg, ".champion.tmp-1234-deadbeef").write_text('{"version": "v')
    registry.promote(reg, "v1")
    stop = threading.Event()
    errors: list[BaseException] = []

    def promoter():
        try:
            i = 0
            while not stop.is_set():
                registry.promote(reg, f"v{i % 3 + 1}", reason="x" * (i % 500))
                i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=promoter)
    t.start()
    reads = set()
    try:
        for _ in range(1500):
            text = Path(reg, "champion").read_text()
            reads.add(json.loads(text)["version"])  # always whole, always valid JSON
            reads.add(registry.champion(reg))
    finally:
        stop.set()
        t.join()
    assert not errors
    assert reads <= {"v1", "v2", "v3"} and len(reads) > 1
    assert [v.version for v in registry.list_versions(reg)] == ["v1", "v2", "v3"]  # the tmp file is ignored


def test_malformed_pointer(artifacts, tmp_path):
    reg = str(tmp_path / "reg")
    registry.register(reg, artifacts[0])
    Path(reg, "champion").write_text("{bad")
    with pytest.raises(ModelError, match=r"champion: is not valid JSON"):
        registry.champion(reg)
    Path(reg, "champion").write_text('{"version": 3}')
    with pytest.raises(ModelError, match=r'champion: must hold \{"version": "vN", ...\}'):
        registry.resolve(reg)


def test_not_a_registry(artifacts, tmp_path):
    a, _ = artifacts
    with pytest.raises(ModelError, match="is a model artifact folder, not a registry"):
        registry.init_registry(a)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="is not a model registry and not empty"):
        registry.register(str(busy), a)
    with pytest.raises(ModelError, match="is not a model registry"):
        registry.list_versions(str(busy))
    with pytest.raises(ModelError, match="missing model.json"):
        registry.register(str(tmp_path / "reg"), str(busy))


def test_remote_registry_on_fsspec(artifacts):
    """The same operations on a non-local fsspec filesystem (memory://): exclusive claims, single-object pointer."""
    a, b = artifacts
    fs = fsspec.filesystem("memory")
    reg = "memory://segpipe-test-registry"
    try:
        assert registry.register(reg, a) == "v1"
        assert registry.register(reg, b, metrics=METRICS) == "v2"
        # a claimed but unfinished version is skipped and its number not reused
        fs.pipe_file("/segpipe-test-registry/v3/.claim", b"other writer")
        assert registry.register(reg, a) == "v4"
        assert [v.version for v in registry.list_versions(reg)] == ["v1", "v2", "v4"]
        registry.promote(reg, "v2", reason="remote")
        assert registry.champion(reg) == "v2"
        assert registry.resolve(reg) == f"{reg}/v2"
        assert load_artifact(registry.resolve(f"{reg}@v4")).sha256 == load_artifact(a).sha256
        assert load_artifact(registry.resolve(reg)).sha256 == load_artifact(b).sha256
        assert registry.history(reg)[-1]["reason"] == "remote"
    finally:
        if fs.exists("/segpipe-test-registry"):
            fs.rm("/segpipe-test-registry", recursive=True)


def test_prune_keeps_the_newest_the_champion_and_the_previous_champion(artifacts, tmp_path):
    """Defect: the registry grew with every retrain (~280 MB) and nothing removed old versions."""
    import shutil

    from click.testing import CliRunner

    from segpipe.cli.main import main as cli

    a, _ = artifacts
    reg = tmp_path / "reg"
    registry.init_registry(str(reg))
    run = reg / "runs" / "20260101T000000Z"
    shutil.copytree(a, run / "challenger")  # a retrain round's run folder, as retrain leaves it
    for source in (a, a, str(run / "challenger"), a, a):
        registry.register(str(reg), source)
    registry.promote(str(reg), "v2")
    registry.promote(str(reg), "v4")  # previous champion: v2
    sizes = {v: sum(p.stat().st_size for p in (reg / v).rglob("*") if p.is_file()) for v in ("v1", "v3")}
    sizes["v3"] += sum(p.stat().st_size for p in run.rglob("*") if p.is_file())

    dry = registry.prune(str(reg), 1, dry_run=True)
    assert [v for v, _ in dry.removed] == ["v1", "v3"] and (reg / "v1").exists() and run.exists()
    result = CliRunner().invoke(cli, ["models", "prune", str(reg), "--keep", "1"])
    assert result.exit_code == 0, result.output
    assert [v.version for v in registry.list_versions(str(reg))] == ["v2", "v4", "v5"]
    assert not run.exists()  # v3's run folder went with it
    assert f"removed v1 ({sizes['v1'] / 1e6:,.1f} MB), v3 ({sizes['v3'] / 1e6:,.1f} MB)" in result.output
    assert f"freed {(sizes['v1'] + sizes['v3']) / 1e6:,.1f} MB" in result.output
    assert "kept: v2 (previous champion), v4 (champion), v5 (newest)" in result.output
    assert dry.freed == sizes["v1"] + sizes["v3"]
    assert registry.resolve(str(reg)).endswith("v4")
    # the newest version always stays: numbers are never handed out twice
    bad = CliRunner().invoke(cli, ["models", "prune", str(reg), "--keep", "0"])
    assert bad.exit_code == 2 and "--keep must be at least 1" in bad.output
