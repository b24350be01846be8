"""The ``actstats`` command line: parse options, call the library, print.

Library errors become one sentence on stderr and exit code 2 (a traceback
only with ``--debug``); exit code 1 is kept for ``--fail-on``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from actstats import __version__

EXIT_FLAGGED = 1
EXIT_BAD_INPUT = 2


def _guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and exit code 2 (``--debug``: re-raise)."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        from actstats.errors import ActStatsError

        try:
            return command(*args, **kwargs)
        except ActStatsError as err:
            if debug:
                raise
            click.echo(f"actstats: error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as err:  # a bug in actstats: still one line, the traceback on request
            if debug:
                raise
            click.echo(
                f"actstats: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                err=True,
            )
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


_debug_option = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")


class _SchemeHelpOption(click.Option):
    """An option whose help lists the init schemes, read from the registry only when shown."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from actstats.schemes import ALIASES, SCHEME_NAMES

        record = super().get_help_record(ctx)
        if record is None:
            return None
        aliases = ", ".join(f"{alias}={name}" for alias, name in ALIASES.items())
        return record[0], f"{record[1]} Schemes: {', '.join(SCHEME_NAMES)} (aliases: {aliases})."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="actstats")
def cli() -> None:
    """Per-layer activation and gradient statistics for any PyTorch model.

    \b
    Example:
      actstats probe examples/cifar_net.py:build --input-shape 3,32,32
    """


def _parse_fail_on(ctx: click.Context, param: click.Parameter, value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    from actstats.diagnose import FLAG_KINDS

    kinds = [k.strip() for k in value.split(",") if k.strip()]
    for kind in kinds:
        if kind != "any" and kind not in FLAG_KINDS:
            raise click.BadParameter(f"unknown flag kind {kind!r}; expected 'any' or some of: {', '.join(FLAG_KINDS)}")
    return frozenset(kinds)


def _parse_thresholds(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    from dataclasses import fields

    from actstats.diagnose import Thresholds

    known = [f.name for f in fields(Thresholds)]
    out: dict[str, float] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise click.BadParameter(f"{item!r} is not KIND=VALUE with KIND one of: {', '.join(known)}")
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if not number > 0:
            raise click.BadParameter(f"{item!r}: the value must be a positive number")
        out[key] = number
    return out


def _model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("model_spec", metavar="MODEL_SPEC"),
        click.option("--inputs", "inputs_spec", metavar="FILE.py:FN",
                     help="A callable batch_size -> batch (tensor, tuple or dict of kwargs). "
                          "Example: --inputs data.py:make_batch"),
        click.option("--input-shape", metavar="C,H,W",
                     help="Shape of one sample, batch dim excluded, for models built without "
                          "example inputs. Example: --input-shape 3,32,32"),
        click.option("--input-dtype", type=click.Choice(["float", "long"]), default="float",
                     show_default=True, help="float: standard normal; long: token ids (needs --vocab-size)."),
        click.option("--vocab-size", type=click.IntRange(min=1), metavar="N",
                     help="Token ids are drawn uniformly from [0, N) with --input-dtype long."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per probe batch (with --input-shape or --inputs)."),
        click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Probe batches; statistics are merged exactly over all of them."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds the model build, the probe batches, the cotangents and dropout."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                     help="Where to run; auto means cuda when available."),
        click.option("--eval", "eval_mode", is_flag=True,
                     help="Probe in eval mode (default: train mode, what training sees)."),
        click.option("--no-backward", is_flag=True,
                     help="Forward statistics only; skip the standard-normal cotangent backward."),
        click.option("--eps", type=click.FloatRange(min=0), default=0.01, show_default=True,
                     help="Saturation tolerance: outputs within eps of an asymptote count as saturated."),
        click.option("--threshold", "thresholds", multiple=True, metavar="KIND=VALUE",
                     callback=_parse_thresholds,
                     help="Override a flag threshold (repeatable). Defaults: vanishing/exploding/"
                          "vanishing_grad/exploding_grad=10 (factor), init_mismatch=2 (factor), "
                          "dead_relu=0.5, saturated=0.5 (fractions). Example: --threshold dead_relu=0.3"),
        click.option("--logdir", type=click.Path(file_okay=False, writable=True), metavar="DIR",
                     help="Write TensorBoard events (histograms, per-layer scalars, the "
                          "propagation curve, flags) to DIR; compare writes DIR/<scheme>."),
        click.option("--bins", type=click.IntRange(min=2), default=64, show_default=True,
                     help="Histogram bins per layer with --logdir."),
        click.option("--fail-on", callback=_parse_fail_on, metavar="KIND[,KIND...]|any",
                     help="Exit with code 1 when a flag of a listed kind is raised (for CI). "
                          "Example: --fail-on vanishing,nonfinite"),
        _debug_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _probe_inputs(loaded: Any, inputs_spec: str | None, input_shape: str | None, input_dtype: str,
                  vocab_size: int | None, seed: int) -> Any:
    from actstats import inputs as inputs_mod
    from actstats.errors import InputError
    from actstats.loading import load_inputs

    if inputs_spec:
        return load_inputs(inputs_spec)
    if input_shape:
        shape = inputs_mod.parse_shape(input_shape)
        return inputs_mod.synthetic(shape, dtype=input_dtype, vocab_size=vocab_size, seed=seed)
    if loaded.example_inputs is None:
        raise InputError(
            f"{loaded.spec!r} returned a model without example inputs; pass --input-shape "
            "(per sample, e.g. 3,32,32) or --inputs file.py:fn"
        )
    example = loaded.example_inputs
    return tuple(example) if isinstance(example, list) else example


@cli.command()
@_model_options
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="What to print on stdout.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), metavar="PATH",
              help="Also write the JSON report (schema actstats.report/1) to PATH.")
@click.option("--init", "init", cls=_SchemeHelpOption, metavar="SCHEME[:KEY=VALUE,...]",
              help="Re-initialize the weights before probing. Example: --init kaiming, "
                   "--init constant:val=0.0042,bias=0.0042.")
@_guarded
def probe(model_spec: str, inputs_spec: str | None, input_shape: str | None, input_dtype: str,
          vocab_size: int | None, batch_size: int, batches: int, seed: int, device: str,
          eval_mode: bool, no_backward: bool, fmt: str, json_path: str | None, eps: float,
          thresholds: dict[str, float], fail_on: frozenset[str], init: str | None,
          logdir: str | None, bins: int) -> None:
    """Probe MODEL_SPEC (path/to/file.py:callable or package.module:callable).

    The callable takes no required arguments and returns a module or a pair
    (module, example_inputs). Prints one row per layer call: activation
    mean/std, gradient std, dead and saturated units, measured gain vs He.

    \b
    Examples:
      actstats probe examples/cifar_net.py:build --input-shape 3,32,32
      actstats probe examples/deep_mlp.py:build --format json --json report.json
    """
    from actstats import inputs as inputs_mod
    from actstats.loading import load_model
    from actstats.probe import probe as run_probe
    from actstats.schemes import parse_scheme
    from actstats.table import render

    if input_shape:
        inputs_mod.parse_shape(input_shape)  # validate options before touching the model
    if init:
        parse_scheme(init)
    loaded = load_model(model_spec, seed=seed)
    source = _probe_inputs(loaded, inputs_spec, input_shape, input_dtype, vocab_size, seed)
    report = run_probe(
        loaded.model, source, batches=batches, batch_size=batch_size, backward=not no_backward,
        device=device, seed=seed, train=not eval_mode, eps=eps, thresholds=thresholds, init=init,
        histogram_bins=bins if logdir else 0,
    )
    if logdir:
        _write_tensorboard(report, logdir)
    for notice in report.notices:
        click.echo(f"actstats: notice: {notice}", err=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            handle.write(report.to_json() + "\n")
    if fmt == "json":
        click.echo(report.to_json())
    elif fmt == "csv":
        click.echo(report.to_csv(), nl=False)
    else:
        click.echo(render(report, color=sys.stdout.isatty()))
    _exit_for_flags(report, fail_on)


def run_name(scheme: str) -> str:
    """A directory name for a scheme's TensorBoard run: ``normal:std=0.05`` -> ``normal_std=0.05``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", scheme)


def _write_tensorboard(report: Any, logdir: str) -> None:
    from actstats.tensorboard import TensorBoardSink

    with TensorBoardSink(logdir) as sink:
        sink.write_report(report, 0, histograms=report.histograms)


def _exit_for_flags(report: Any, fail_on: frozenset[str]) -> None:
    raised = {flag.kind for flag in report.flags}
    hit = raised if "any" in fail_on else raised & fail_on
    if hit:
        click.echo(f"actstats: failing: flag(s) raised: {', '.join(sorted(hit))}", err=True)
        sys.exit(EXIT_FLAGGED)


@cli.command()
@_model_options
@click.option("--inits", cls=_SchemeHelpOption, default="default,xavier,kaiming,lecun", show_default=True,
              metavar="SCHEME,SCHEME,...", help="The init schemes to compare, comma-separated.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="What to print on stdout (json: schema actstats.compare/1).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), metavar="PATH",
              help="Also write the actstats.compare/1 JSON document to PATH.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), metavar="PATH",
              help="Also draw every scheme's signal propagation in one picture (needs the plot extra).")
@_guarded
def compare(model_spec: str, inputs_spec: str | None, input_shape: str | None, input_dtype: str,
            vocab_size: int | None, batch_size: int, batches: int, seed: int, device: str,
            eval_mode: bool, no_backward: bool, eps: float, thresholds: dict[str, float],
            fail_on: frozenset[str], logdir: str | None, bins: int, inits: str, fmt: str,
            json_path: str | None, plot_path: str | None) -> None:
    """Compare init schemes on MODEL_SPEC: the same batches, one row per scheme, a verdict.

    Each scheme re-initializes a fresh copy of the model as built; the best
    scheme raises the fewest severe flags (vanishing, exploding, non-finite,
    symmetric), then the fewest flags, then has the layer gain closest to theory.
    --fail-on applies to the best scheme.

    \b
    Examples:
      actstats compare examples/deep_mlp.py:build --inits default,xavier,kaiming
      actstats compare examples/mobilenet_v2.py:build --inits normal:std=0.05,xavier,kaiming
    """
    import json

    from actstats import inputs as inputs_mod
    from actstats.compare import compare as run_compare
    from actstats.loading import load_model
    from actstats.schemes import parse_scheme
    from actstats.table import render_comparison

    schemes = [s.strip() for s in _split_schemes(inits) if s.strip()]
    if plot_path:
        from actstats.plot import require_matplotlib

        require_matplotlib()  # fail before the probes, not after
    if input_shape:
        inputs_mod.parse_shape(input_shape)
    for scheme in schemes:
        parse_scheme(scheme)
    loaded = load_model(model_spec, seed=seed)
    source = _probe_inputs(loaded, inputs_spec, input_shape, input_dtype, vocab_size, seed)
    result = run_compare(
        loaded.model, source, schemes, batches=batches, batch_size=batch_size,
        backward=not no_backward, device=device, seed=seed, train=not eval_mode, eps=eps,
        thresholds=thresholds, histogram_bins=bins if logdir else 0,
    )
    if logdir:
        for scheme, report in result.reports.items():
            _write_tensorboard(report, os.path.join(logdir, run_name(scheme)))
    for scheme, report in result.reports.items():
        for notice in report.notices:
            click.echo(f"actstats: notice: [{scheme}] {notice}", err=True)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    if plot_path:
        from actstats.plot import plot_reports

        plot_reports(list(result.reports.values()), plot_path, labels=list(result.reports))
    if fmt == "json":
        click.echo(text)
    else:
        click.echo(render_comparison(result, color=sys.stdout.isatty()))
    _exit_for_flags(result.reports[result.best], fail_on)


@cli.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="REPORT.json...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              metavar="PATH", help="Where to write the picture (PNG, or any format matplotlib knows).")
@click.option("--title", help="Title of the figure (default: the model name).")
@click.option("--dpi", type=click.IntRange(min=10), default=100, show_default=True, help="Resolution.")
@_debug_option
@_guarded
def plot(reports: tuple[str, ...], output: str, title: str | None, dpi: int) -> None:
    """Draw activation and gradient rms against depth from JSON reports (signal propagation).

    Several reports (or a compare document with several schemes) are overlaid,
    one colour each; the dashed line is what He/Xavier theory predicts (the rms
    kept at its input level); flagged records are circled. Needs the plot
    extra: pip install 'actstats[plot]'.

    \b
    Example:
      actstats probe examples/deep_mlp.py:build --json default.json
      actstats probe examples/deep_mlp.py:build --init kaiming --json kaiming.json
      actstats plot default.json kaiming.json -o spp.png
    """
    from actstats.plot import load_reports, plot_reports

    pairs = [pair for path in reports for pair in load_reports(path)]
    plot_reports([doc for _, doc in pairs], output, labels=[label for label, _ in pairs], title=title, dpi=dpi)
    click.echo(f"wrote {output}", err=True)


def _split_schemes(text: str) -> list[str]:
    """Split ``a,b:key=1,key2=2,c`` into schemes: a comma starts a new scheme unless
    what follows it is a ``key=value`` parameter of the scheme before."""
    out: list[str] = []
    for piece in text.split(","):
        if out and "=" in piece and ":" in out[-1] and ":" not in piece:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
