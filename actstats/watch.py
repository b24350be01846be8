"""``actstats.watch``: the probe's statistics inside a training loop, on sampled steps only.

```python
with actstats.watch(model, logdir="runs/exp", every=100) as w:
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        w.step()
```

Steps are counted from 0 by :meth:`Watch.step`; step k is sampled when
``k % every == 0``. Hooks are installed only for a sampled step (from the
``step()`` that opens it to the ``step()`` that closes it; with ``every=1``
they stay from one sampled step to the next, and modules added in between
are hooked at the next forward), so an unsampled step runs no actstats code
at all. A sampled step covers every forward and
backward between two ``step()`` calls (gradient accumulation); forward passes
run under ``torch.no_grad()`` (evaluation) are left out of it. Closing a
sampled step merges its statistics on the device, across processes when
``torch.distributed`` is initialized (one all-gather, whatever the number of
layers), moves them to the host in one transfer, diagnoses
them, and on rank 0 writes them to TensorBoard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from actstats.diagnose import FLAG_KINDS, Thresholds
from actstats.errors import FlagRaisedError, InputError
from actstats.hooks import Recorder, RecordSummary, unwrap
from actstats.probe import conclude
from actstats.report import Report


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _all_reduce(sums: torch.Tensor, maxes: torch.Tensor) -> None:
    """Merge a sampled step across processes with one collective (an all-gather of both
    vectors): counts, sums, sums of squares, zero, non-finite and saturated counts and
    histogram bins add up; maxima, negated minima and alive-unit masks take the maximum."""
    dist = torch.distributed
    local = torch.cat([sums, maxes])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    sums.copy_(stacked[:, : sums.numel()].sum(0))
    maxes.copy_(stacked[:, sums.numel():].amax(0))


class Watch:
    """The context manager returned by :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        logdir: str | None = None,
        writer: Any = None,
        every: int = 100,
        histograms: bool = False,
        raise_on: Iterable[str] = (),
        thresholds: Thresholds | Mapping[str, float] | None = None,
        bins: int = 64,
        eps: float = 0.01,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model is a {type(model).__name__}, not a torch.nn.Module")
        if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
            raise InputError(
                "actstats.watch cannot observe a torch.compile'd model: compiled graphs do not run "
                "Python hooks; watch the model before compiling it, or probe its _orig_mod"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        if logdir is not None and writer is not None:
            raise InputError("give logdir or writer, not both")
        kinds = tuple(raise_on)
        unknown = [k for k in kinds if k not in FLAG_KINDS and k != "any"]
        if unknown:
            raise InputError(f"raise_on has unknown flag kind(s) {', '.join(map(repr, unknown))}; "
                             f"expected 'any' or some of: {', '.join(FLAG_KINDS)}")
        try:
            self.thresholds = Thresholds.from_mapping(thresholds)
        except ValueError as err:
            raise InputError(str(err)) from err
        self.model = model
        self.root = unwrap(model)
        self.every = every
        self.bins = bins if histograms else 0
        self.raise_on = frozenset(kinds)
        self.eps = eps
        self._logdir = logdir
        self._writer = writer
        self._sink: Any = None
        self._recorder: Recorder | None = None
        self._report: Report | None = None
        self._hints: dict[str, tuple[tuple[float, float] | None, tuple[float, float] | None]] = {}
        self._not_symmetric: set[nn.Module] = set()  # modules a sampled step found not symmetric
        self._step = 0
        self._entered = False

    # --- lifetime --------------------------------------------------------------

    def __enter__(self) -> Watch:
        if self._entered:
            raise InputError("this watch is already in use; create a new actstats.watch(...)")
        self._entered = True
        if (self._logdir is not None or self._writer is not None) and _rank() == 0:
            from actstats.tensorboard import TensorBoardSink

            self._sink = TensorBoardSink(writer=self._writer) if self._writer is not None \
                else TensorBoardSink(self._logdir)
        self._open_if_sampled()
        return self

    def __exit__(self, *exc: object) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.detach()
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close()

    def __repr__(self) -> str:
        state = "sampling" if self._recorder is not None else "idle"
        return f"Watch(step={self._step}, every={self.every}, {state})"

    # --- steps -----------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """The index of the step now open (0 before the first ``step()``)."""
        return self._step

    def sampled(self, step: int) -> bool:
        """Whether ``step`` is a sampled step: ``step % every == 0``."""
        return step % self.every == 0

    def step(self) -> None:
        """Close the current step (once per optimizer step) and open the next one.

        Raises:
            FlagRaisedError: a flag of a kind in ``raise_on`` was raised on the
                step just closed (the watch goes on if the caller continues).
        """
        closing, recorder = self._step, self._recorder
        self._recorder = None
        self._step += 1
        # Consecutive sampled steps (every=1) keep the hooks: the recorder is reset, not rebuilt.
        keep = recorder is not None and self.sampled(self._step)
        flagged = None
        if recorder is not None:
            try:
                if not keep:
                    recorder.detach()
                flagged = self._close(closing, recorder)
            except BaseException:
                recorder.detach()
                raise
        if keep:
            recorder.reset(histogram_bins=self._bins(), range_hints=self._hints)  # type: ignore[union-attr]
            self._recorder = recorder
        else:
            self._open_if_sampled()
        if flagged is not None:
            raise FlagRaisedError(f"step {closing}: {flagged}")

    def flush(self) -> None:
        """Write pending TensorBoard events to disk now (no-op without a logdir or writer)."""
        if self._sink is not None:
            self._sink.flush()

    def report(self) -> Report | None:
        """The report of the latest sampled step (merged across processes), or None before one."""
        return self._report

    def _bins(self) -> int:
        """Histogram bins for the step now opening. Across processes, bins only add up when
        every rank uses the same range: the ranges merged on the previous sampled step; the
        first one has no histograms."""
        return self.bins if self._hints or not _distributed() else 0

    def _open_if_sampled(self) -> None:
        if self.sampled(self._step):
            self._recorder = Recorder(
                self.root, backward=True, eps=self.eps, histogram_bins=self._bins(),
                range_hints=self._hints, record_no_grad=False, not_symmetric=self._not_symmetric,
            ).attach()

    def _close(self, step: int, recorder: Recorder) -> str | None:
        done = conclude(recorder, self.root, thresholds=self.thresholds, eps=self.eps,
                        all_reduce=_all_reduce if _distributed() else None)
        if not done.summaries:
            return None
        # Distinct units never become identical; identical ones can separate: only "not symmetric" is kept.
        self._not_symmetric.update(module for module, fig in done.figures.items() if not fig.symmetric)
        shape = done.input.shape
        self._report = Report(
            model=type(self.root).__name__, device=str(next(iter(self.root.parameters()), torch.empty(0)).device),
            batches=recorder.forward_calls, batch_size=shape[0] if shape else None, input=done.input,
            layers=done.layers, flags=done.flags, histograms=done.histograms,
        )
        self._hints = {s.name: _ranges(s) for s in done.summaries}
        if self._sink is not None:
            self._sink.write_report(self._report, step, histograms=done.histograms or None)
        for flag in done.flags:
            if flag.kind in self.raise_on or "any" in self.raise_on:
                return flag.message
        return None


def _ranges(s: RecordSummary) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """Histogram ranges for the next sampled step, from the statistics gathered on this one."""
    act = (s.act.min, s.act.max) if s.act_hist is not None else None
    grad = (s.grad_hist.min, s.grad_hist.max) if s.grad_hist is not None else None
    return act, grad


def watch(
    model: nn.Module,
    *,
    logdir: str | None = None,
    writer: Any = None,
    every: int = 100,
    histograms: bool = False,
    raise_on: Iterable[str] = (),
    thresholds: Thresholds | Mapping[str, float] | None = None,
) -> Watch:
    """Watch ``model`` during training; call ``w.step()`` once per optimizer step.

    Args:
        model: the model (DDP/DataParallel wrappers are looked through; records
            are named without ``module.``). A ``torch.compile``'d model is refused.
        logdir: write TensorBoard events here (rank 0 only), or pass ``writer``,
            an existing ``SummaryWriter`` (left open on exit).
        every: sample one step in ``every``; steps 0, every, 2*every, ...
        histograms: also write activation and gradient histograms, computed on
            the device (64 bins; the range of a record comes from its min/max
            on the previous sampled step, or on its first call; under
            torch.distributed from the second sampled step on, so that every
            rank bins alike).
        raise_on: flag kinds (or ``"any"``) that make ``w.step()`` raise
            :class:`~actstats.errors.FlagRaisedError`, e.g. ``("nonfinite",)``.
        thresholds: flag thresholds, as for :func:`actstats.probe`.

    Returns:
        A context manager; on exit, also through an exception, every hook is
        removed and the model is as it was.
    """
    return Watch(model, logdir=logdir, writer=writer, every=every, histograms=histograms,
                 raise_on=raise_on, thresholds=thresholds)
