"""TensorBoard event files for a :class:`~actstats.report.Report` (SPEC 8).

The only module of actstats that imports ``torch.utils.tensorboard``; it does so
lazily, inside :class:`TensorBoardSink`, so ``import actstats`` stays light.

Tags (``<layer>`` is the record name made tag-safe by :func:`tag_name`):

- ``act_std/<layer>``, ``act_mean/<layer>``: every record, at ``step``;
- ``grad_std/<layer>``: records with gradient statistics;
- ``dead_frac/<layer>``: ReLU-family records; ``saturation/<layer>``: sigmoid/tanh family;
- ``propagation/act_rms``, ``propagation/grad_rms``: one point per record, step = record index;
- ``activations/<layer>``, ``gradients/<layer>``: histograms handed to ``write_report``;
- ``flags``: the flags as a markdown table (text plugin).

A custom-scalars layout (category ``actstats``, written once per run) puts each
scalar family, and the propagation curve, on one multi-line chart.

Example::

    report = actstats.probe(model, x)
    with TensorBoardSink("runs/probe") as sink:
        sink.write_report(report, step=0)
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import struct
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from actstats.report import Flag, Report
from actstats.report import Histogram

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["Histogram", "TensorBoardSink", "tag_name"]

LAYOUT_CATEGORY = "actstats"

# Characters TensorBoard accepts in a tag; "-" is allowed too, but tag_name uses it as its escape.
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")

# Writers that already hold an actstats layout: one layout per run even when several sinks share a writer.
_LAID_OUT: weakref.WeakSet[Any] = weakref.WeakSet()


@functools.lru_cache(maxsize=1 << 14)  # the same layers every sampled step: each name is escaped once
def tag_name(layer: str) -> str:
    """Make a record name valid inside a TensorBoard tag (``[A-Za-z0-9_./-]``), injectively.

    Letters, digits, ``_`` and ``.`` are kept, so module paths read as they are
    (``layer1.0.conv1``). ``-``, which never occurs in a Python attribute name,
    is the escape character:

    - ``()`` (a functional activation) becomes ``-fn``;
    - ``#`` before a digit (a repeated call) becomes ``-``;
    - ``-`` itself becomes ``--``;
    - any other character (``/``, a lone ``(``, a space, non-ASCII) becomes
      ``-uXXXX`` (4 hex digits) or ``-UXXXXXXXX`` (8), its code point.

    The character after each ``-`` says which rule applied (``-``, ``f``, a
    digit, ``u``, ``U``), so the mapping can be undone and distinct names give
    distinct tags. ``/`` is escaped so that a name stays one tag component.

    >>> [tag_name(n) for n in ["relu", "relu#1", "relu()", "relu()#1", "layer1.0.relu_()#2"]]
    ['relu', 'relu-1', 'relu-fn', 'relu-fn-1', 'layer1.0.relu_-fn-2']
    """
    if not layer:
        raise ValueError("a record name must not be empty to become a TensorBoard tag")
    out: list[str] = []
    i, n = 0, len(layer)
    while i < n:
        ch = layer[i]
        if ch in _PLAIN:
            out.append(ch)
        elif ch == "-":
            out.append("--")
        elif ch == "(" and layer.startswith("()", i):
            out.append("-fn")
            i += 1
        elif ch == "#" and i + 1 < n and layer[i + 1] in "0123456789":
            out.append("-")
        elif ord(ch) < 0x10000:
            out.append(f"-u{ord(ch):04x}")
        else:
            out.append(f"-U{ord(ch):08x}")
        i += 1
    return "".join(out)


class TensorBoardSink:
    """Write :class:`~actstats.report.Report` objects as TensorBoard events (SPEC 8).

    Args:
        logdir: directory for a new ``SummaryWriter`` (created if missing); the
            sink owns that writer and closes it in :meth:`close`.
        writer: an existing ``SummaryWriter`` to write to instead; the sink
            flushes it but never closes it.

    Exactly one of ``logdir`` and ``writer`` must be given. The sink is a
    context manager: leaving the ``with`` block calls :meth:`close`.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None = None, *, writer: SummaryWriter | None = None) -> None:
        if (logdir is None) == (writer is None):
            raise TypeError("TensorBoardSink takes exactly one of logdir and writer; "
                            f"got logdir={logdir!r} and writer={writer!r}")
        self._owns_writer = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy: imported only when used

            os.makedirs(logdir, exist_ok=True)  # type: ignore[arg-type]
            writer = SummaryWriter(log_dir=os.fspath(logdir))  # type: ignore[arg-type]
            _write_directly(writer)
        self._writer: SummaryWriter = writer
        self._closed = False

    @property
    def writer(self) -> SummaryWriter:
        """The ``SummaryWriter`` this sink writes to."""
        return self._writer

    @property
    def logdir(self) -> str:
        """The directory the event files go to."""
        return str(self._writer.get_logdir())

    def write_report(
        self,
        report: Report,
        step: int,
        *,
        histograms: Mapping[str, tuple[Histogram | None, Histogram | None]] | None = None,
    ) -> None:
        """Write one report's scalars, propagation curve, histograms and flags at ``step``, then flush.

        Per-record scalars (``act_std``, ``act_mean``, ``grad_std``, ``dead_frac``,
        ``saturation``) go at ``step``. Non-finite values (NaN, Inf: a record
        whose output had NaN, a std that overflowed) are skipped, not written, as
        TensorBoard cannot draw them; the report's ``nonfinite`` counts and the
        ``nonfinite`` flag tell about them. Histograms that are empty or hold a
        non-finite figure are skipped likewise.

        ``propagation/act_rms`` and ``propagation/grad_rms`` carry one point per
        record whose *step is the record's index*: x is depth, so one call draws
        one signal-propagation curve. They are written on every call, so a
        training run (``watch``) stores one curve per sampled step in the same
        tag; that is expected. TensorBoard shows the latest curve (its data
        server drops, per tag, the points whose step is not below a newly
        arrived one), while the event file keeps every curve
        (``EventAccumulator`` returns them all, in write order).

        Args:
            report: the report to write.
            step: the global step of the events (the training step for ``watch``).
            histograms: record name -> ``(activation histogram, gradient
                histogram)``, either may be None; written as
                ``activations/<layer>`` and ``gradients/<layer>``.

        The custom-scalars layout is written on the first call (see :meth:`write_layout`).
        """
        self._check_open()
        step = int(step)
        histograms = dict(histograms or {})
        names = {layer.name for layer in report.layers}
        unknown = [name for name in histograms if name not in names]
        if unknown:
            raise ValueError(f"histograms given for {unknown!r}, which are not records of this report; "
                             f"records: {', '.join(layer.name for layer in report.layers)}")
        self.write_layout(report)
        # Scalars sharing a step go out as one event (one Summary holding every value): the
        # event file writer's cost is per event (and per byte: its CRC is pure Python).
        per_step: list[tuple[str, float | None]] = []
        for layer in report.layers:
            tag = tag_name(layer.name)
            per_step += [(f"act_std/{tag}", layer.act.std), (f"act_mean/{tag}", layer.act.mean)]
            if layer.grad is not None:
                per_step.append((f"grad_std/{tag}", layer.grad.std))
            if layer.dead_frac is not None:
                per_step.append((f"dead_frac/{tag}", layer.dead_frac))
            if layer.saturation is not None:
                per_step.append((f"saturation/{tag}", layer.saturation))
        self._scalars(per_step, step)
        for layer in report.layers:
            self._scalars([("propagation/act_rms", layer.act.rms),
                           ("propagation/grad_rms", layer.grad.rms if layer.grad is not None else None)],
                          layer.index)
        for layer in report.layers:
            act_hist, grad_hist = histograms.get(layer.name, (None, None))
            tag = tag_name(layer.name)
            self._histogram(f"activations/{tag}", act_hist, step)
            self._histogram(f"gradients/{tag}", grad_hist, step)
        self._text("flags", flags_markdown(report.flags), step)
        self._writer.flush()

    def write_layout(self, report: Report) -> None:
        """Write the custom-scalars layout once per writer; later calls do nothing.

        One category, ``actstats``, with a multi-line chart per scalar family
        (``act_std``, ``act_mean``, ``grad_std``, and ``dead_frac`` /
        ``saturation`` when ``report`` has such records) and ``propagation``
        (``act_rms`` and ``grad_rms`` against depth). Charts select tags by
        regular expression, so records that appear later are included.
        """
        self._check_open()
        if self._writer in _LAID_OUT:
            return
        charts: dict[str, list[Any]] = {
            "act_std": ["Multiline", [r"act_std/.*"]],
            "act_mean": ["Multiline", [r"act_mean/.*"]],
            "grad_std": ["Multiline", [r"grad_std/.*"]],
        }
        if any(layer.dead_frac is not None for layer in report.layers):
            charts["dead_frac"] = ["Multiline", [r"dead_frac/.*"]]
        if any(layer.saturation is not None for layer in report.layers):
            charts["saturation"] = ["Multiline", [r"saturation/.*"]]
        charts["propagation"] = ["Multiline", [r"propagation/act_rms", r"propagation/grad_rms"]]
        self._writer.add_custom_scalars({LAYOUT_CATEGORY: charts})
        _LAID_OUT.add(self._writer)

    def flush(self) -> None:
        """Write pending events to disk."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if this sink created it; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"TensorBoardSink(logdir={self.logdir!r}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"this TensorBoardSink ({self.logdir}) is closed; create a new one to write more")

    def _scalars(self, values: Sequence[tuple[str, float | None]], step: int) -> None:
        """Write the finite values as one event at ``step`` (what ``add_scalar`` writes, batched)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        kept = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values
                if v is not None and math.isfinite(v)]
        if kept:
            self._writer._get_file_writer().add_summary(Summary(value=kept), step)

    def _histogram(self, tag: str, hist: Histogram | None, step: int) -> None:
        if hist is None or not hist.finite:
            return
        limits, counts = _without_empty_runs(hist.bucket_limits(), list(hist.counts))
        self._writer.add_histogram_raw(
            tag,
            min=hist.min,
            max=hist.max,
            num=hist.num,
            sum=hist.sum,
            sum_squares=hist.sum_squares,
            bucket_limits=limits,
            bucket_counts=counts,
            global_step=step,
        )

    def _text(self, tag: str, markdown: str, step: int) -> None:
        # add_text stores under "<tag>/text_summary"; SPEC 8 names the tag "flags", so the
        # text-plugin summary is built the same way and its tag set before writing.
        from torch.utils.tensorboard.summary import text

        summary = text(tag, markdown)
        summary.value[0].tag = tag
        self._writer._get_file_writer().add_summary(summary, step)


def _write_directly(writer: SummaryWriter) -> None:
    """Give a writer the sink created a :class:`_RecordBuffer` in place of TensorBoard's writer thread.

    Nothing changes when the kernels are not built or TensorBoard's internals
    are not where this expects them; nothing global is touched.
    """
    from actstats import native

    if native.kernels is None or not native.enabled:
        return
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriter
        from tensorboard.summary.writer.record_writer import RecordWriter

        events = writer._get_file_writer().event_writer
        queue = events._async_writer
        if type(queue) is not _AsyncWriter or type(queue._writer) is not RecordWriter:
            return
        file = queue._writer._writer
        queue.flush()  # what is queued so far reaches the file
        queue._worker.stop()  # the thread ends; the file stays open
        events._async_writer = _RecordBuffer(file)
    except (AttributeError, ImportError):
        return


class _RecordBuffer:
    """Frames a writer's events as TensorBoard records, in memory, and appends them to the
    event file on each flush (the sink flushes after each report).

    TensorBoard's own writer hands every event to a thread that computes its
    masked CRC-32C in pure Python (about 200 us per KB) and opens, appends to and
    closes the file; with a few hundred events per report the handing over and the
    checksums cost more than computing the histograms. The same bytes come out.
    Events written through :attr:`TensorBoardSink.writer` between reports reach
    the file with the next report, :meth:`TensorBoardSink.flush` or ``close``.
    """

    def __init__(self, file: Any) -> None:
        from actstats.native import kernels

        self._crc = kernels.masked_crc32c
        self._file = file
        self._pending = bytearray()
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            raise OSError("Writer is closed")
        header = struct.pack("<Q", len(data))
        self._pending += header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data))
        if len(self._pending) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(bytes(self._pending))
            self._pending.clear()
        self._file.flush()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._file.close()
            self._closed = True


def _without_empty_runs(limits: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
    """Merge each run of consecutive empty buckets into one empty bucket (its last right edge).

    The same histogram, fewer bytes: a bucket spans from the previous limit to
    its own, so a merged empty bucket covers exactly the empty range.
    """
    if all(counts):  # no empty bucket: nothing to merge
        return limits, counts
    # bucket i is kept unless it and the next one are both empty (a run keeps its last); counts
    # are whole numbers >= 0, so a sum is zero exactly when both are
    kept = list(map(operator.add, counts, counts[1:] + [1.0]))
    return list(itertools.compress(limits, kept)), list(itertools.compress(counts, kept))


def flags_markdown(flags: Sequence[Flag]) -> str:
    """The flags as a markdown table (kind, layer, message); ``no flags raised`` when there are none."""
    if not flags:
        return "no flags raised"
    rows = ["| kind | layer | message |", "|---|---|---|"]
    for flag in flags:
        rows.append(f"| `{flag.kind}` | `{_cell(flag.layer)}` | {_cell(flag.message)} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
