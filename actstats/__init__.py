"""actstats: per-layer activation and gradient statistics, held against init theory."""

from __future__ import annotations

__version__ = "0.1.0"

from actstats.errors import ActStatsError

__all__ = ["ActStatsError", "__version__"]
