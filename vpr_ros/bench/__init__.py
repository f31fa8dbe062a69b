"""Benchmarks behind `vpr bench`: each module measures one piece (search, encoder, node) and
returns plain dicts, so the CLI can print a table or JSON and docs can quote the same figures."""
