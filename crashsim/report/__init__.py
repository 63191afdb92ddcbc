"""Reports of a crashsim run: per-scenario HTML pages with PNG figures, an index, junit.xml.

``core`` holds what the formats share (safe paths, atomic all-or-nothing writes, the
outcome colour map); ``plots``, ``html`` and ``junit`` each own one output format.
"""
from .core import write_reports

__all__ = ["write_reports"]
