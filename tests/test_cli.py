"""The command line as users run it: one clear line per problem, no traceback, honest exit codes."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from segpipe.cli.main import main
from tests.helpers import write_geotiff


def run(*args):
    return CliRunner().invoke(main, [*args])


def test_model_create_and_info(tmp_path):
    r = run("model", "create", "--arch", "FPN", "--encoder", "resnet18", "--classes", "a,b,c", "--out",
            str(tmp_path / "m"), "--seed", "2")
    assert r.exit_code == 0, r.output
    r = run("model", "info", str(tmp_path / "m"))
    info = json.loads(r.output)
    assert info["architecture"] == "FPN" and info["classes"] == ["a", "b", "c"] and len(info["weights_sha256"]) == 64


def test_model_create_sets_class_colours(tmp_path):
    r = run("model", "create", "--classes", "bg,building,water", "--class-colors", "#000,#ff0000,#0000FF",
            "--out", str(tmp_path / "m"))
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["class_colors"] == ["#000000", "#ff0000", "#0000ff"]
    r = run("model", "create", "--classes", "bg,building", "--class-colors", "#000", "--out", str(tmp_path / "n"))
    assert r.exit_code == 2 and r.stderr.strip() == ("error: --class-colors: gives 1 colour(s) for 2 class(es); "
                                                     "give one per class, in --classes order")
    r = run("model", "create", "--classes", "bg,building", "--class-colors", "#000,blue", "--out", str(tmp_path / "n"))
    assert r.exit_code == 2 and r.stderr.strip() == "error: blue: is not a colour; expected '#rrggbb'"
    assert not (tmp_path / "n").exists()


def test_unknown_architecture_is_one_line(tmp_path):
    r = run("model", "create", "--arch", "Unett", "--classes", "a,b", "--out", str(tmp_path / "m"))
    assert r.exit_code == 2
    assert r.stderr.startswith("error: Unett: unknown architecture; valid: ") and "Traceback" not in r.output


def test_segment_folder_reports_each_bad_image(tmp_path, photo, model_dir):
    src = tmp_path / "src"
    src.mkdir()
    write_geotiff(src / "ok.tif", photo[:, :150, :140])
    (src / "zero.tif").write_bytes(b"")
    r = run("segment", str(src), "--model", model_dir, "--out", str(tmp_path / "out"), "--chunk-size", "64",
            "--halo", "16", "--no-progress", "--precision", "fp32")
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {src}/zero.tif: is empty (0 bytes)"]
    assert "Traceback" not in r.output
    assert (tmp_path / "out" / "ok.zarr" / "zarr.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["segment", "{tmp}/missing.tif", "--model", "{model}", "--out", "{tmp}/o"], "missing.tif: does not exist"),
        (["segment", "{scene}", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], "nomodel: model folder does not exist"),
        (["segment", "{scene}", "--model", "{model}", "--out", "/proc/segpipe-out"], "/proc/segpipe-out: cannot be written"),
        (["segment", "{scene}", "--model", "{model}", "--out", "{tmp}/o", "--bands", "1,x"], "error: --bands: takes comma"),
        (["segment", "{scene}", "--model", "{model}", "--out", "{tmp}/o", "--bands", "1,2,5"], "has 3 band(s); --bands asks for band 5"),
        (["segment", "{scene}", "--model", "{model}", "--out", "{tmp}/o", "--device", "gpu"], "device must be auto, cpu, cuda"),
    ],
)
def test_bad_inputs_one_line(tmp_path, scene_tif, model_dir, args, expected):
    args = [a.format(tmp=tmp_path, model=model_dir, scene=scene_tif) for a in args]
    r = run(*args, "--no-progress")
    assert r.exit_code in (1, 2)
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.output


def test_subprocess_debug_shows_traceback(tmp_path):
    base = [sys.executable, "-m", "segpipe.cli.main"]
    plain = subprocess.run([*base, "model", "info", str(tmp_path / "x")], capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [f"error: {tmp_path}/x: model folder does not exist"]
    debug = subprocess.run([*base, "--debug", "model", "info", str(tmp_path / "x")], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_bug_is_one_line_pointing_at_the_log_file(tmp_path, monkeypatch):
    import segpipe.models.artifact

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setenv("SEGPIPE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(segpipe.models.artifact, "create_artifact", broken)
    r = run("model", "create", "--classes", "a,b", "--out", str(tmp_path / "m"))
    assert r.exit_code == 3
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: unexpected RuntimeError: boom (a bug in segpipe; traceback in ")
    log = line.split("traceback in ")[1].split(";")[0]
    assert log.startswith(str(tmp_path / "logs")) and "RuntimeError: boom" in open(log).read()


def test_both_module_entry_points_run():
    for module in ("segpipe.cli", "segpipe.cli.main"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert p.returncode == 0 and "Commands:" in p.stdout, p.stderr
        assert all(c in p.stdout for c in ("segment", "model", "models", "train", "evaluate", "retrain", "export",
                                           "demo"))


@pytest.mark.parametrize(("args", "expected"), [
    (["--mpp", "0.5", "--gsd", "1"], "error: train at one resolution: mpp (slides) or gsd (rasters), not both"),
    (["--patch-size", "33"], "error: --patch-size: patch_size must be a multiple of 32 (encoders downsample 32×), "
                             "got 33"),
    (["--epochs", "0"], "error: --epochs: Input should be greater than or equal to 1 (got 0)"),
])
def test_a_bad_option_value_is_one_line_without_pydantic_prefixes(tmp_path, args, expected):
    r = run("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m"), *args)
    assert r.exit_code == 2 and r.stderr.strip() == expected, r.stderr


def test_train_help_names_vector_labels_beside_masks():
    r = run("train", "--help")
    assert r.exit_code == 0 and "masks/" in r.output and "labels/ (vector labels" in r.output
    for command in ("evaluate", "retrain"):
        assert "labels/ (vector labels" in run(command, "--help").output
