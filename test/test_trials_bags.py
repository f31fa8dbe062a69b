"""Adversarial trials on rosbags given to ``vpr map build``: header stamps going backwards
(reversed, shuffled, a clock reset), storage files cut at seeded offsets, and a metadata.yaml
that lies (wrong counts, types, file names, garbage). Each asserts a clear error, or a map with
what it left out counted and warned about; never a traceback, never a silently thinner map."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from vpr_ros.cli import main
from vpr_ros.errors import VPRError
from vpr_ros.mapdb.bag_writer import write_route_bag
from vpr_ros.mapdb.build import BuildConfig, build_map

from test_map_build import ThumbnailEncoder  # noqa: E402
from trials import assert_clear, count, rng  # noqa: E402

S = 1_000_000_000
T0 = 1_700_000_000 * S
N = 60
TOPIC = "/camera/image_raw"


def picture(i: int) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([(x * 5 + i * 11) % 256, (y * 7 + i * 3) % 256,
                     (x + y + i * 13) % 256], axis=-1).astype(np.uint8)


def bag_with_stamps(path: Path, header_stamps: list[int], storage: str = "sqlite3") -> Path:
    """A 10 Hz camera bag recorded in order (bag time rising) whose header stamps are
    ``header_stamps``; no poses, so keyframes are chosen by time (1 per second)."""
    from vpr_ros.mapdb.bag_writer import BagWriter

    with BagWriter(path, storage) as writer:
        writer.add_image_topic(TOPIC)
        for i, stamp in enumerate(header_stamps):
            writer.write_image(TOPIC, stamp, picture(i), log_time_ns=T0 + i * S // 10)
    return path


def in_order() -> list[int]:
    return [T0 + i * S // 10 for i in range(N)]


@pytest.mark.parametrize("order", ["reversed", "shuffled", "clock-reset"])
def test_stamps_going_backwards_are_counted_and_warned(tmp_path: Path, order: str) -> None:
    """The reported case: reversed or shuffled header stamps kept 1-3 keyframes of 60 frames
    with exit code 0 and no warning. Frames stamped before one already read are skipped,
    counted in the summary, and a warning says why."""
    stamps = in_order()
    if order == "reversed":
        stamps = stamps[::-1]
    elif order == "shuffled":
        stamps = [stamps[i] for i in rng("shuffle").permutation(N)]
    else:  # the camera clock jumps back 100 s halfway
        stamps = stamps[:30] + [s - 100 * S for s in stamps[30:]]
    bag = bag_with_stamps(tmp_path / "bag", stamps)
    _, summary = build_map(bag, TOPIC, ThumbnailEncoder(), tmp_path / "map")
    ordered = sorted(stamps)
    expected_skipped = sum(1 for i, s in enumerate(stamps) if s < max(stamps[:i], default=s))
    assert summary.frames_read == N
    assert summary.frames_out_of_order == expected_skipped > 0
    assert any("stamps going backwards" in w for w in summary.warnings)
    assert summary.keyframes >= 1 and summary.keyframes + summary.frames_out_of_order <= N
    assert "out of order" in summary.format()
    _, clean = build_map(bag_with_stamps(tmp_path / "ok", ordered), TOPIC, ThumbnailEncoder(),
                         tmp_path / "map_ok")
    assert clean.frames_out_of_order == 0 and clean.keyframes == 6
    assert not any("stamps going backwards" in w for w in clean.warnings)


def test_vpr_map_build_reports_backwards_stamps(tmp_path: Path, effnet_gem_model_dir: Path,
                                                capsys, caplog) -> None:
    bag = bag_with_stamps(tmp_path / "bag", in_order()[::-1])
    rc = main(["map", "build", str(bag), "--image-topic", TOPIC, "--model",
               str(effnet_gem_model_dir), "--backend", "torch", "-o", str(tmp_path / "map"),
               "--json", "--no-progress"])  # torch: this is about stamps, not backend choice
    out, err = capsys.readouterr()
    assert rc == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["frames_out_of_order"] == N - 1
    assert "stamps going backwards" in caplog.text + err


def _route(path: Path, storage: str) -> Path:
    frames = [(s, picture(i)) for i, s in enumerate(in_order())]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
             for i in range(2 * N)]
    return write_route_bag(path, frames, poses, storage=storage)


def _outcome(bag: Path, out: Path, what: str):
    try:
        return build_map(bag, TOPIC, ThumbnailEncoder(), out, pose_topic="/odom",
                         config=BuildConfig(batch_size=8))[1]
    except VPRError as exc:
        assert_clear(exc, what)
        return None


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_cut_storage_files(tmp_path: Path, storage: str) -> None:
    """A recording killed mid-write, cut at seeded offsets: a clear error, or a map of what was
    before the cut, flagged as damaged, never more keyframes than the whole bag gives."""
    bag = _route(tmp_path / "bag", storage)
    whole = _outcome(bag, tmp_path / "whole", "whole bag")
    assert whole is not None and not whole.bag_damaged
    storage_file = next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))
    pristine = storage_file.read_bytes()
    g = rng("cut", storage)
    for j, keep in enumerate(sorted(g.integers(16, len(pristine) - 1, count(3)))):
        damaged = Path(shutil.copytree(bag, tmp_path / f"cut{j}"))
        (damaged / storage_file.name).write_bytes(pristine[:int(keep)])
        summary = _outcome(damaged, tmp_path / f"map{j}", f"{storage} cut to {keep} bytes")
        if summary is not None:
            assert summary.keyframes <= whole.keyframes
            assert summary.frames_read < whole.frames_read or summary.bag_damaged or \
                summary.frames_read == whole.frames_read


def _lies(info: dict) -> list[tuple[str, dict | str]]:
    """Ways a metadata.yaml can lie: counts, types, names, durations, garbage."""
    def edit(fn):
        doc = json.loads(json.dumps(info, default=str))
        fn(doc["rosbag2_bagfile_information"])
        return doc

    topics = lambda d: d["topics_with_message_count"]  # noqa: E731
    return [
        ("count x1000", edit(lambda d: [t.update(message_count=t["message_count"] * 1000)
                                        for t in topics(d)])),
        ("count 0", edit(lambda d: [t.update(message_count=0) for t in topics(d)])),
        ("count -5", edit(lambda d: [t.update(message_count=-5) for t in topics(d)])),
        ("image type std_msgs/String",
         edit(lambda d: [t["topic_metadata"].update(type="std_msgs/msg/String")
                         for t in topics(d) if t["topic_metadata"]["name"] == TOPIC])),
        ("no topics", edit(lambda d: d.update(topics_with_message_count=[]))),
        ("wrong file name", edit(lambda d: d.update(relative_file_paths=["nowhere.db3"]))),
        ("storage id mcap", edit(lambda d: d.update(storage_identifier="mcap"))),
        ("duration negative", edit(lambda d: d["duration"].update(nanoseconds=-1))),
        ("version 99", edit(lambda d: d.update(version=99))),
        ("deep nesting", "[" * 1_100),
        ("not yaml", "{{{: ]["),
        ("empty", ""),
    ]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_lying_metadata(tmp_path: Path, storage: str) -> None:
    """metadata.yaml edited to lie: a clear error, or the same map the honest bag gives."""
    bag = _route(tmp_path / "bag", storage)
    whole = _outcome(bag, tmp_path / "whole", "whole bag")
    info = yaml.safe_load((bag / "metadata.yaml").read_text())
    lies = _lies(info)
    g = rng("metadata", storage)
    for j in g.choice(len(lies), size=min(len(lies), count(6)), replace=False):
        label, doc = lies[j]
        lying = Path(shutil.copytree(bag, tmp_path / f"lie{j}"))
        (lying / "metadata.yaml").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        summary = _outcome(lying, tmp_path / f"map{j}", f"{storage} metadata: {label}")
        if summary is not None:
            assert summary.keyframes == whole.keyframes, f"{storage} metadata: {label}"
            assert summary.frames_read == whole.frames_read, f"{storage} metadata: {label}"
