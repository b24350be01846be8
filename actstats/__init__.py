"""actstats: per-layer activation and gradient statistics, held against init theory."""

from __future__ import annotations

__version__ = "0.1.0"

from actstats.errors import ActStatsError
from actstats.probe import probe
from actstats.report import Flag, LayerReport, Report

__all__ = ["ActStatsError", "Flag", "LayerReport", "Report", "__version__", "probe"]
