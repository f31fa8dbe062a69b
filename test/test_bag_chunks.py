"""The chunk salvage both bag walkers (ROS 1, MCAP) share: a cut-off compressed chunk yields
what its bytes still decode to, with a warning that says how much; a codec the format does not
use is refused with a message naming the ones it does."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from vpr_ros.errors import BagError
from vpr_ros.mapdb.bag_chunks import MCAP_CHUNKS, ROS1_CHUNKS, skip_damage


def test_a_cut_off_bz2_chunk_yields_its_leading_bytes_and_warns() -> None:
    raw = bytes(range(256)) * 400
    packed = bz2.compress(raw)
    warnings: list[str] = []
    whole = ROS1_CHUNKS.salvage(Path("a.bag"), 7, packed, "bz2", len(raw), False, warnings.append)
    assert whole == raw and warnings == []
    part = ROS1_CHUNKS.salvage(Path("a.bag"), 7, packed[: len(packed) * 3 // 4], "bz2",
                               len(raw), True, warnings.append)
    assert part is not None and len(part) < len(raw) and raw.startswith(part)
    assert len(warnings) == 1 and f"salvaging the {len(part)} of {len(raw)} bytes" in warnings[0]


def test_undecodable_chunks_are_lost_with_a_warning_and_unknown_codecs_refused() -> None:
    warnings: list[str] = []
    assert ROS1_CHUNKS.salvage(Path("a.bag"), 3, b"not bz2 at all", "bz2", None, False,
                               warnings.append) is None
    assert "chunk at byte 3 cannot be decompressed" in warnings[0]
    assert MCAP_CHUNKS.decompress_partial(b"abc", "") == b"abc"
    with pytest.raises(BagError, match="expected none, zstd or lz4"):
        MCAP_CHUNKS.decompress_partial(b"abc", "bz2")
    with pytest.raises(BagError, match="ROS 1 chunk compression 'zstd'.*none, bz2 or lz4"):
        ROS1_CHUNKS.decompress_partial(b"abc", "zstd")


def test_skip_damage_reports_where_the_walk_resumes() -> None:
    warnings: list[str] = []
    assert skip_damage(Path("b.mcap"), "chunk", 10, 25, warnings.append) == 25
    assert skip_damage(Path("b.mcap"), "file", 40, None, warnings.append) is None
    assert warnings == ["b.mcap: skipped 15 damaged bytes at byte 10 of the chunk",
                        "b.mcap: damaged or cut-off record at byte 40 of the file; nothing "
                        "readable after it"]
