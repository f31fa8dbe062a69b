"""Aggregators: dense backbone features -> one global descriptor. Importing registers them."""

from vpr_ros.models.aggregators import gem, qaa  # noqa: F401
from vpr_ros.models.aggregators import selavpr  # noqa: F401
from vpr_ros.models.aggregators import cqvpr  # noqa: F401
from vpr_ros.models.aggregators import boq, vlaq  # noqa: F401
