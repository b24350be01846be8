"""The exceptions actstats raises; every one derives from :class:`ActStatsError`."""

from __future__ import annotations


class ActStatsError(Exception):
    """Base class for every error raised by actstats (the CLI maps it to exit code 2)."""


class ModelSpecError(ActStatsError, ValueError):
    """A MODEL_SPEC or ``--inputs`` spec that cannot be loaded or called."""


class InputError(ActStatsError, ValueError):
    """Inputs that cannot be turned into probe batches."""


class ForwardError(ActStatsError, RuntimeError):
    """The model's forward (or backward) failed while being probed."""


class NothingToHookError(ActStatsError, ValueError):
    """A model with no parameters, no leaf module besides the root and no functional activation."""


class UnknownSchemeError(ActStatsError, ValueError):
    """An init scheme name, or a parameter of one, that actstats does not know."""


class InitError(ActStatsError, RuntimeError):
    """An init scheme that could not be applied (for example LSUV on a dead layer)."""


class FlagRaisedError(ActStatsError):
    """Raised by ``watch(raise_on=...)`` when a listed flag kind is raised."""
