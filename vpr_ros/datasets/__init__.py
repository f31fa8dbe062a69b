"""Dataset readers: where images and their place labels come from.

Training readers return a :class:`~vpr_ros.datasets.place_set.PlaceSet` (images + place labels +
an order of places for contiguous splits): :mod:`gsv_cities`, :mod:`msls` (train/val),
:mod:`utm_folder` (``@easting@northing@...`` names) and :mod:`traversals` (index-aligned folders
such as the shared :mod:`nordland` thumbnails). Evaluation reads database/query folders with
:func:`~vpr_ros.datasets.image_sets.read_image_set`.
"""
