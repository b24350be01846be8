"""actstats: per-layer activation and gradient statistics, held against init theory."""

from __future__ import annotations

__version__ = "0.1.0"

from actstats.diagnose import Thresholds
from actstats.errors import ActStatsError
from actstats.probe import probe
from actstats.report import Flag, LayerReport, Report
from actstats.schemes import InitSummary, init_weights
from actstats.watch import Watch, watch

__all__ = [
    "ActStatsError", "Flag", "InitSummary", "LayerReport", "Report", "Thresholds",
    "Watch", "__version__", "init_weights", "probe", "watch",
]
