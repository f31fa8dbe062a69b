"""Adversarial trials on the ``vpr`` command line: output paths the system refuses, and resume
checkpoints that are pickles. Every case must end with exit code 2 and one ``error:`` line,
never a traceback, and a pickle must never run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from vpr_ros.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_error_line(rc: int, err: str, what: str) -> None:
    assert rc == 2, f"{what}: exit code {rc}: {err}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, f"{what}: {err}"


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "plain_file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("argv", [
    ["map", "build", "{tmp}/no_bag", "--image-topic", "/cam", "--model", "{tmp}/no_model",
     "-o", "/etc/passwd/x"],
    ["map", "build", "{tmp}/no_bag", "--image-topic", "/cam", "--model", "{tmp}/no_model",
     "-o", "{file}/sub/map"],
    ["model", "init", "config/models/gem_effnetlite0.yaml", "-o", "{file}/model"],
    ["export", "onnx", "{model}", "-o", "{file}/m.onnx", "--no-verify"],
], ids=["map-build-etc-passwd", "map-build-under-file", "model-init-under-file",
        "export-under-file"])
def test_output_paths_the_system_refuses(argv, tmp_path: Path, a_file: Path, capsys,
                                         effnet_gem_model_dir: Path) -> None:
    """The reported case: ``vpr map build -o /etc/passwd/x`` ended in a NotADirectoryError
    traceback (after reading the bag). Refused before any work, in one line naming the path."""
    args = [a.format(tmp=tmp_path, file=a_file, model=effnet_gem_model_dir) for a in argv]
    rc, err = run_cli(capsys, *args)
    assert_one_error_line(rc, err, " ".join(args))
    out = args[args.index("-o") + 1]
    assert str(Path(out).parent.parent if "sub" in out else Path(out).parent) in err or \
        str(a_file) in err or "/etc/passwd" in err, err


# -- vpr train --resume ------------------------------------------------------------------------


def _recipe(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folders = []
    for name in ("s", "w"):
        (tmp_path / name).mkdir()
        for i in range(6):
            img = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (48, 48),
                             interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(tmp_path / name / f"f{i:03d}.png"), img)
        folders.append(str(tmp_path / name))
    doc = {"model": {"config": str(REPO / "config/models/gem_effnetlite0.yaml")},
           "data": {"train": [{"name": "tiny", "kind": "aligned", "folders": folders,
                               "places_per_batch": 2, "images_per_place": 2}]},
           "trainer": {"max_steps": 1, "progress_bar": False, "num_workers": 0},
           "output": str(tmp_path / "out")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vpr_trial_resume_ran",))


def test_resume_never_unpickles_a_user_checkpoint(tmp_path: Path, capsys) -> None:
    """The reported case: ``vpr train --resume PATH`` handed the file to Lightning, which
    unpickled it with ``weights_only`` unset. A checkpoint with any object besides tensors and
    plain data is refused before training starts; a damaged or foreign file too."""
    marker = Path("/tmp/vpr_trial_resume_ran")
    marker.unlink(missing_ok=True)
    recipe = _recipe(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "loops": _RunsCode()}, evil)
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"w": torch.zeros(3)}, weights_only)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(evil.read_bytes()[:200])
    for path, message in ((evil, "never loaded"), (raw, "never loaded"),
                          (weights_only, "not a training checkpoint"),
                          (cut, "truncated, corrupt")):
        rc, err = run_cli(capsys, "train", "--config", recipe, "--resume", path)
        assert_one_error_line(rc, err, f"--resume {path.name}")
        assert message in err, err
        assert "weights_only=False" not in err
    assert not marker.exists(), "a pickle in a resume checkpoint ran code"
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before any training
