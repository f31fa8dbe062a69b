"""Training: recipes, place-balanced sampling, losses, the Lightning loop, feature caching.

Entry point: :func:`vpr_ros.train.run.train` (``vpr train --config YAML``). Importing this
package does not import Lightning; the modules that need it import it themselves.
"""
