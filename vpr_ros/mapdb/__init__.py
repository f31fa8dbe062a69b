"""The map database: keyframes, their descriptors and a search index, saved crash-safely.

``PlaceMap`` is the one object callers use (add, search with exclusions, save, load, merge,
info); ``Keyframe`` and ``Exclusion`` are the plain records it takes. Index kinds live in
``vpr_ros.mapdb.index``, the on-disk format in ``vpr_ros.mapdb.storage``.
"""

from vpr_ros.mapdb.keyframe import Exclusion, Keyframe, KeyframeTable
from vpr_ros.mapdb.place_map import PlaceMap

__all__ = ["Exclusion", "Keyframe", "KeyframeTable", "PlaceMap"]
