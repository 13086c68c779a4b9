"""The `normlab` command: the thinnest layer over the library.

Subcommands::

    normlab demo      one-minute look at BN and LN on digits
    normlab lab       run the lab's experiments (missing seeds only), write the report
    normlab list      list the lab's experiments
    normlab report    rebuild the report from the database, without running anything
    normlab doctor    diagnose a model's normalization (when normlab.diagnostics.doctor exists)
    normlab bench     time the normalization kernels (when normlab.bench exists)

Every module behind a subcommand is imported only when that subcommand runs, so ``normlab
--help`` stays fast. User errors (bad arguments, unknown experiment, unusable database) print
one line to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from typing import NoReturn

__all__ = ["build_parser", "main"]

# Subcommands whose arguments a colleague's module owns: (name, module, help).
_PLUGINS = (
    ("doctor", "normlab.diagnostics.doctor", "diagnose the normalization of a model"),
    ("bench", "normlab.bench", "time normlab's normalization kernels against torch"),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``normlab lab: error: ... (see --help)``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        what = "a finite number" if not math.isfinite(number) else "an integer"
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r} (not {what})"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _plugin_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The `normlab` argument parser (plugin subcommands only where their module exists)."""
    parser = _Parser(
        prog="normlab", description="Normalization for deep learning: layers, diagnostics, lab."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="train a sigmoid MLP on digits with and without normalization"
    )
    demo.add_argument("--steps", type=_positive_int, default=1500)
    demo.add_argument("--seed", type=int, default=0)

    lab = sub.add_parser(
        "lab",
        help="measure the claims: run missing seeds, store them, write the report",
        description="Run every experiment (or the ones named) for --seeds seeds, skipping runs "
        "the database already holds, then compute the verdicts and write the HTML report.",
    )
    lab.add_argument(
        "experiments", nargs="*", metavar="EXPERIMENT", help="names or claim ids (default: all)"
    )
    lab.add_argument("--quick", action="store_true", help="small configs (seconds per run)")
    lab.add_argument("--seeds", type=_positive_int, default=3, help="seeds per experiment (3)")
    lab.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (all cores)"
    )
    lab.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run on Ray: a cluster address, 'auto', or 'local' (needs `pip install ray`)",
    )
    lab.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value: key=value (all selected) or experiment.key=value",
    )
    _db_out(lab)

    sub.add_parser("list", help="list the lab's experiments")

    report = sub.add_parser(
        "report",
        help="rebuild the report from the database (no runs)",
        description="Recompute verdicts and figures from the stored runs and write the report.",
    )
    _db_out(report)

    for name, module, text in _PLUGINS:
        if _plugin_available(module):
            # Arguments are added by the module itself, imported only when the command runs.
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _db_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", default="normlab.db", metavar="PATH", help="results database (normlab.db)"
    )
    parser.add_argument(
        "--out", default="normlab-report", metavar="DIR", help="report folder (normlab-report)"
    )


def _fail(message: str) -> int:
    print(f"normlab: error: {message}", file=sys.stderr)
    return 2


def _run_plugin(name: str, module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"normlab {name}", description=(module.__doc__ or "").split("\n")[0])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)))


def _lab(args: argparse.Namespace) -> int:
    from rich.console import Console

    from normlab.lab.runner import load_registry, run_lab, select

    registry = load_registry()
    experiments = select(registry, args.experiments)
    outcome = run_lab(
        experiments,
        db=args.db,
        out=args.out,
        quick=args.quick,
        seeds=args.seeds,
        workers=args.workers,
        ray_address=args.ray_address,
        overrides=args.overrides,
        progress=True,
        console=Console(),
        registry=registry,
    )
    s = outcome.sweep
    print(
        f"runs: {s.count('finished')} finished, {s.count('failed')} failed, "
        f"{s.count('skipped')} already in {args.db}; report: {outcome.index}"
    )
    return 1 if s.count("failed") else 0


def _list() -> int:
    from rich.console import Console
    from rich.table import Table

    from normlab.lab.runner import load_registry

    table = Table(title="normlab lab: experiments", title_justify="left")
    table.add_column("claim", style="bold", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("title")
    for e in load_registry():
        table.add_row(e.claim, e.name, e.title)
    Console().print(table)
    return 0


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from normlab.lab.runner import LabError, load_registry, rebuild_report

    try:
        registry = load_registry()
    except LabError as exc:  # still report what the database holds
        print(f"normlab: warning: {exc}; reporting stored metrics only", file=sys.stderr)
        registry = []
    _, index = rebuild_report(args.db, args.out, registry, console=Console())
    print(f"report: {index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `normlab` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    plugins = {name: module for name, module, _ in _PLUGINS}
    if args.command in plugins:
        return _run_plugin(args.command, plugins[args.command], extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        from normlab.demo import main as demo_main

        return demo_main(args.steps, args.seed)

    # Errors of the user's making are one line and status 2; anything else is a bug: traceback.
    from normlab.lab.runner import LabError
    from normlab.lab.store import StoreError
    from normlab.lab.sweep import SweepError

    try:
        if args.command == "lab":
            return _lab(args)
        if args.command == "list":
            return _list()
        if args.command == "report":
            return _report(args)
    except (LabError, StoreError, SweepError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("normlab: interrupted; finished runs are stored, rerun to resume", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
