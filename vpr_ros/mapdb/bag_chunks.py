"""Salvaging compressed chunks and damaged records, shared by the ROS 1 and MCAP bag walkers.

Both formats group messages into compressed chunks and both walkers must survive a bag cut off
or damaged in the middle: a chunk is decompressed as far as its bytes go (a streaming
decompressor returns what it could decode instead of refusing the whole chunk), a short chunk
is reported with how much of it remains, and a damaged stretch of records is reported with the
walk's resynchronisation point. The formats differ only in their codec names, so the salvage
rules live here once.
"""

from __future__ import annotations

import bz2
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vpr_ros.errors import BagError


@dataclass(frozen=True)
class ChunkFormat:
    """A bag format's chunk compression: its name (in messages), the string a chunk header
    gives for uncompressed data, and the codecs it supports."""

    name: str
    raw: str
    codecs: tuple[str, ...]

    def decompress_partial(self, data: bytes, compression: str) -> bytes:
        """A chunk's bytes, as many as a (possibly cut-off) compressed chunk still yields;
        BagError for a codec the format does not use."""
        if compression == self.raw:
            return data
        if compression not in self.codecs:
            raise BagError(f"{self.name} chunk compression {compression!r} is not supported; "
                           f"expected none, {' or '.join(self.codecs)}")
        if compression == "bz2":
            return bz2.BZ2Decompressor().decompress(data)
        if compression == "zstd":
            if sys.version_info >= (3, 14):
                from compression import zstd  # type: ignore[import-not-found]
            else:
                from backports import zstd  # type: ignore[import-not-found]
            return zstd.ZstdDecompressor().decompress(data)
        if compression == "lz4":
            import lz4.frame  # type: ignore[import-untyped]

            return lz4.frame.LZ4FrameDecompressor().decompress(data)
        raise BagError(f"{self.name} chunk compression {compression!r} has no decompressor")

    def salvage(self, path: Path, pos: int, data: bytes, compression: str,
                size: Optional[int], cut: bool, warn: Callable[[str], None]) -> Optional[bytes]:
        """The decompressed chunk at byte ``pos``, or None (warned) when none of it can be
        decompressed; warns when it is cut off (``cut``: the file ends inside it) or shorter
        than its header's uncompressed ``size``. An unsupported codec stays a BagError."""
        try:
            inner = self.decompress_partial(data, compression)
        except BagError:
            raise
        except Exception as exc:
            warn(f"{path}: chunk at byte {pos} cannot be decompressed ({exc}); its messages "
                 "are lost")
            return None
        size = len(inner) if size is None else size
        if cut or len(inner) < size:
            warn(f"{path}: chunk at byte {pos} is cut off; salvaging the {len(inner)} of "
                 f"{size} bytes that remain")
        return inner


def skip_damage(path: Path, where: str, pos: int, resume: Optional[int],
                warn: Callable[[str], None]) -> Optional[int]:
    """Report a damaged record at byte ``pos`` of the ``where`` (file or chunk): ``resume`` is
    where the walk found the next plausible record (returned), None when nothing readable
    follows."""
    if resume is None:
        warn(f"{path}: damaged or cut-off record at byte {pos} of the {where}; nothing "
             "readable after it")
    else:
        warn(f"{path}: skipped {resume - pos} damaged bytes at byte {pos} of the {where}")
    return resume


ROS1_CHUNKS = ChunkFormat("ROS 1", "none", ("bz2", "lz4"))
MCAP_CHUNKS = ChunkFormat("MCAP", "", ("zstd", "lz4"))
