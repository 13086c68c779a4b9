"""The lab report: verdicts recomputed from stored runs, a self-contained HTML page, a terminal table.

:func:`build_entries` turns the finished runs of each ``(experiment, config_hash)`` into a
:class:`ReportEntry`: it asks the experiment for its verdict and figures (from the stored
``RunResult`` objects, so ``normlab report`` never reruns anything) and aggregates every metric
over seeds. :func:`write_report` writes ``index.html`` (inline CSS, no external assets; figures
are PNG files next to it), ``results.json`` and the figures into one folder, and
:func:`print_verdicts` prints the verdict table with rich.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab.experiment import Experiment, RunResult, Verdict
from normlab.lab.store import Store, StoredRun, versions

__all__ = [
    "MetricSummary",
    "ReportEntry",
    "build_entries",
    "print_verdicts",
    "write_report",
]


@dataclass
class MetricSummary:
    """One metric over seeds: mean and sample standard deviation of the finite values.

    Attributes:
        mean: mean of the finite values (NaN if none).
        std: their standard deviation (``ddof=1``; NaN for fewer than two).
        n: number of finite values.
        n_total: number of seeds that reported the metric (non-finite ones included).
    """

    mean: float
    std: float
    n: int
    n_total: int


@dataclass
class ReportEntry:
    """Everything the report shows about one experiment.

    Attributes:
        name: experiment name.
        claim: claim id (``C3``); ``?`` if the experiment is not registered any more.
        title: the claim in words.
        literature: what the literature reports.
        config: the config the runs used.
        config_hash: its hash.
        seeds: seeds of the finished runs.
        verdict: the verdict, or None when it could not be computed.
        note: why there is no verdict, or what went wrong while plotting.
        figures: figure paths relative to the report folder.
        metrics: every metric over the seeds.
        failures: ``(seed, error text)`` of failed runs.
        seconds: total run time of the finished runs.
        versions: versions of the most recent finished run.
    """

    name: str
    claim: str
    title: str
    literature: str
    config: dict[str, Any]
    config_hash: str
    seeds: list[int] = field(default_factory=list)
    verdict: Verdict | None = None
    note: str | None = None
    figures: list[str] = field(default_factory=list)
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The verdict's status, or ``no verdict``."""
        return self.verdict.status if self.verdict is not None else "no verdict"

    @property
    def anchor(self) -> str:
        """The HTML id of the entry's section."""
        return "exp-" + "".join(c if c.isalnum() else "-" for c in self.name)


# ------------------------------------------------------------------------------------- building


def _summarize(values: Sequence[float]) -> MetricSummary:
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return MetricSummary(mean, std, n, len(values))


def _config_object(experiment: Experiment, config: Mapping[str, Any]) -> Any:
    """The experiment's config dataclass from stored JSON (lists stay lists)."""
    return experiment.config_class(**config)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def build_entries(
    store: Store,
    keys: Sequence[tuple[str, str]],
    experiments: Mapping[str, Experiment],
    out_dir: str | Path,
) -> list[ReportEntry]:
    """Verdicts, metric summaries and figures for each ``(experiment, config_hash)`` in `keys`.

    Figures go to ``out_dir/figures/<experiment>/`` (emptied first, so a rebuild leaves no stale
    figure). An experiment whose ``verdict`` or ``plot`` raises gets a note instead: one broken
    experiment never costs the report.

    Args:
        store: the results store.
        keys: which config of which experiment to report, in report order.
        experiments: registered experiments by name; unknown names still get an entry with their
            stored metrics but no verdict.
        out_dir: the report folder.

    Returns:
        One entry per key.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    entries = []
    for name, chash in keys:
        runs = store.runs(experiment=name, config_hash=chash)
        finished = [r for r in runs if r.status == "finished"]
        experiment = experiments.get(name)
        config = runs[0].config if runs else {}
        entry = ReportEntry(
            name=name,
            claim=getattr(experiment, "claim", "?"),
            title=getattr(experiment, "title", name),
            literature=getattr(experiment, "literature", ""),
            config=config,
            config_hash=chash,
            seeds=[r.seed for r in finished],
            failures=[(r.seed, r.error or "") for r in runs if r.status == "failed"],
            seconds=sum(r.seconds or 0.0 for r in finished),
            versions=_latest(finished).versions if finished else {},
        )
        names: list[str] = []
        for r in finished:
            names.extend(k for k in r.result.metrics if k not in names)
        entry.metrics = {
            k: _summarize([r.result.metrics[k] for r in finished if k in r.result.metrics])
            for k in names
        }
        results: list[RunResult] = [r.result for r in finished]
        fig_dir = out / "figures" / _safe_name(name)
        if fig_dir.exists():
            shutil.rmtree(fig_dir)
        if experiment is None:
            entry.note = f"experiment {name!r} is not registered: stored metrics only"
        elif not results:
            entry.note = "no finished run" + (
                f"; {len(entry.failures)} failed: {_last_line(entry.failures[0][1])}"
                if entry.failures
                else ""
            )
        else:
            try:
                cfg = _config_object(experiment, config)
                entry.verdict = experiment.verdict(cfg, results)
            except Exception:
                entry.note = "verdict failed: " + _last_line(traceback.format_exc())
            else:
                try:
                    fig_dir.mkdir(parents=True, exist_ok=True)
                    paths = experiment.plot(cfg, results, fig_dir)
                    entry.figures = [_into_report(Path(p), fig_dir, out) for p in paths]
                except Exception:
                    entry.note = "plot failed: " + _last_line(traceback.format_exc())
                finally:
                    plt.close("all")
        entries.append(entry)
    return entries


def _latest(runs: Sequence[StoredRun]) -> StoredRun:
    return max(runs, key=lambda r: r.finished or 0.0)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _into_report(path: Path, fig_dir: Path, out: Path) -> str:
    """The figure's path relative to `out`, copying it in if the experiment wrote elsewhere."""
    path = path.resolve()
    try:
        return path.relative_to(out.resolve()).as_posix()
    except ValueError:
        target = fig_dir / path.name
        shutil.copyfile(path, target)
        return target.resolve().relative_to(out.resolve()).as_posix()


# ------------------------------------------------------------------------------------- formats


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.3g}"


def _evidence(entry: ReportEntry) -> str:
    v = entry.verdict
    if v is None:
        return entry.note or "no verdict"
    spread = "" if math.isnan(v.spread) else f" ± {_num(v.spread)}"
    n = len(entry.seeds)
    return f"effect {_num(v.effect)}{spread} {v.unit} ({n} seed{'s' if n != 1 else ''})"


def _agreement(entry: ReportEntry) -> str:
    if entry.verdict is None:
        return "—"
    return {
        True: "agrees with literature",
        False: "disagrees with literature",
        None: "literature contested",
    }[entry.verdict.agrees_with_literature]


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (the report's readers are browsers too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _results_json(entries: Sequence[ReportEntry], meta: dict[str, Any]) -> dict[str, Any]:
    experiments = []
    for e in entries:
        v = e.verdict
        experiments.append(
            {
                "name": e.name,
                "claim": e.claim,
                "title": e.title,
                "literature": e.literature,
                "config": e.config,
                "config_hash": e.config_hash,
                "seeds": e.seeds,
                "verdict": None
                if v is None
                else {
                    "status": v.status,
                    "effect": v.effect,
                    "spread": v.spread,
                    "unit": v.unit,
                    "summary": v.summary,
                    "agrees_with_literature": v.agrees_with_literature,
                },
                "note": e.note,
                "metrics": {
                    k: {"mean": m.mean, "std": m.std, "n": m.n, "n_total": m.n_total}
                    for k, m in e.metrics.items()
                },
                "figures": e.figures,
                "failures": [{"seed": s, "error": err} for s, err in e.failures],
                "seconds": e.seconds,
                "versions": e.versions,
            }
        )
    return _jsonable({"meta": meta, "experiments": experiments})


# ------------------------------------------------------------------------------------- HTML

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-alt: #f6f8fa; --link: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica, Arial,
    sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 32px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 21px; margin: 0 0 6px; }
h3 { font-size: 15px; margin: 22px 0 8px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
.meta { color: var(--muted); margin: 0 0 20px; font-size: 13.5px; }
.counts { display: flex; gap: 10px; flex-wrap: wrap; margin: 0 0 22px; }
.count { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.count b { display: block; font-size: 22px; line-height: 1.2; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; vertical-align: top; padding: 8px 10px;
  border-bottom: 1px solid var(--line); }
th { background: var(--bg-alt); font-weight: 600; white-space: nowrap; }
table.verdicts tbody tr:nth-child(even) { background: #fbfcfd; }
table.verdicts td.claim { font-weight: 600; white-space: nowrap; }
table.verdicts { table-layout: fixed; }
table.verdicts td.lit { color: var(--muted); font-size: 13px; }
table.verdicts td { overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 13px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12.5px;
  font-weight: 600; white-space: nowrap; border: 1px solid transparent; }
.s-supported { background: #dafbe1; color: #116329; border-color: #aceebb; }
.s-not-supported { background: #ffebe9; color: #a40e26; border-color: #ffcecb; }
.s-inconclusive { background: #fff8c5; color: #7d4e00; border-color: #f5e0a0; }
.s-no-verdict { background: #eef1f4; color: #59636e; border-color: var(--line); }
.agree { color: var(--muted); font-size: 12.5px; display: block; margin-top: 4px; }
section.exp { border-top: 1px solid var(--line); margin-top: 40px; padding-top: 26px; }
section.exp .head { display: flex; align-items: baseline; gap: 12px; flex-wrap: wrap; }
.summary { font-size: 16px; margin: 10px 0 4px; }
.lit { color: var(--muted); margin: 4px 0; }
.note { background: #fff8c5; border: 1px solid #f5e0a0; border-radius: 6px; padding: 8px 12px; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; margin: 8px 0; }
figure { margin: 0; flex: 0 1 auto; max-width: 100%; border: 1px solid var(--line);
  border-radius: 8px; padding: 8px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 4px; }
.cols { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.4fr); gap: 24px; }
@media (max-width: 820px) { .cols { grid-template-columns: 1fr; } }
.scroll { max-height: 420px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.scroll table th { position: sticky; top: 0; }
details { margin-top: 10px; }
summary { cursor: pointer; color: var(--link); }
pre { background: var(--bg-alt); padding: 10px; border-radius: 6px; overflow: auto;
  font-size: 12.5px; max-height: 300px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 48px; }
"""

# Marks the page once every figure decoded (headless checks read data-figures from the DOM) and
# counts script/resource errors.
_SCRIPT = """
(function () {
  var errors = 0;
  window.addEventListener("error", function () { errors += 1; }, true);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
    document.body.setAttribute("data-figures", ok ? "ok" : "broken");
    document.body.setAttribute("data-figure-count", String(imgs.length));
    document.body.setAttribute("data-errors", String(errors));
  });
})();
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _badge(status: str) -> str:
    return f'<span class="badge s-{status.replace(" ", "-")}">{_e(status)}</span>'


def _verdict_table(entries: Sequence[ReportEntry]) -> str:
    rows = []
    for e in entries:
        summary = e.verdict.summary if e.verdict is not None else ""
        rows.append(
            "<tr>"
            f'<td class="claim">{_e(e.claim)}</td>'
            f'<td><a href="#{e.anchor}">{_e(e.title)}</a><br>'
            f'<span class="mono" style="color:#59636e">{_e(e.name)}</span></td>'
            f'<td>{_badge(e.status)}<span class="agree">{_e(_agreement(e))}</span></td>'
            f"<td>{_e(summary)}{'<br>' if summary else ''}"
            f'<span style="color:#59636e">{_e(_evidence(e))}</span></td>'
            f'<td class="lit">{_e(e.literature)}</td>'
            "</tr>"
        )
    return (
        '<table class="verdicts"><colgroup><col style="width:6%"><col style="width:18%">'
        '<col style="width:12%"><col style="width:37%"><col style="width:27%"></colgroup>'
        "<thead><tr><th>Claim</th><th>Title</th><th>Verdict</th>"
        "<th>Evidence</th><th>Literature</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class='mono'>{_e(k)}</td><td class='mono'>{_e(json.dumps(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table><thead><tr><th>key</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"


def _metrics_table(metrics: Mapping[str, MetricSummary]) -> str:
    if not metrics:
        return "<p class='lit'>no metrics</p>"
    rows = []
    for name, m in metrics.items():
        nonfinite = m.n_total - m.n
        extra = f" <span class='lit'>(+{nonfinite} non-finite)</span>" if nonfinite else ""
        rows.append(
            f"<tr><td class='mono'>{_e(name)}</td><td class='num'>{_num(m.mean)}</td>"
            f"<td class='num'>{_num(m.std)}</td><td class='num'>{m.n}{extra}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>metric</th><th>mean</th><th>std</th><th>seeds</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return f"<div class='scroll'>{table}</div>"


def _section(e: ReportEntry) -> str:
    parts = [
        f'<section class="exp" id="{e.anchor}">',
        f'<div class="head"><h2>{_e(e.claim)} · {_e(e.title)}</h2>{_badge(e.status)}</div>',
        f"<div class='lit mono'>{_e(e.name)} · config {_e(e.config_hash)} · "
        f"{len(e.seeds)} seed{'s' if len(e.seeds) != 1 else ''} · "
        f"{e.seconds:.1f} s of runs</div>",
    ]
    if e.verdict is not None:
        parts.append(f"<p class='summary'>{_e(e.verdict.summary)}</p>")
        parts.append(f"<p class='lit'>{_e(_evidence(e))} · {_e(_agreement(e))}</p>")
    if e.literature:
        parts.append(f"<p class='lit'><b>Literature:</b> {_e(e.literature)}</p>")
    if e.note:
        parts.append(f"<p class='note'>{_e(e.note)}</p>")
    if e.figures:
        figs = "".join(
            f"<figure><img src='{_e(path)}' alt='{_e(e.name)}: {_e(Path(path).stem)}' "
            f"loading='eager'><figcaption>{_e(Path(path).name)}</figcaption></figure>"
            for path in e.figures
        )
        parts.append(f"<h3>Figures</h3><div class='figures'>{figs}</div>")
    parts.append(
        "<div class='cols'>"
        f"<div><h3>Config</h3>{_kv_table(e.config)}</div>"
        f"<div><h3>Key metrics (over seeds)</h3>{_metrics_table(e.metrics)}</div>"
        "</div>"
    )
    if e.failures:
        fails = "".join(
            f"<details><summary>seed {s} failed: {_e(_last_line(err))}</summary>"
            f"<pre>{_e(err)}</pre></details>"
            for s, err in e.failures
        )
        parts.append(f"<h3>Failed runs</h3>{fails}")
    parts.append("</section>")
    return "\n".join(parts)


def _html(entries: Sequence[ReportEntry], meta: Mapping[str, Any]) -> str:
    counts = {s: sum(e.status == s for e in entries) for s in _STATUSES}
    count_html = "".join(
        f"<div class='count'>{_badge(s)}<b>{n}</b></div>" for s, n in counts.items() if n
    )
    v = meta.get("versions", {})
    meta_line = (
        f"generated {_e(meta['generated'])} · {len(entries)} experiments · database "
        f"<code>{_e(meta.get('db', ''))}</code> · normlab {_e(v.get('normlab'))}, "
        f"torch {_e(v.get('torch'))}, Python {_e(v.get('python'))}"
    )
    body = (
        "<main>"
        "<h1>normlab lab report</h1>"
        f"<p class='meta'>{meta_line}</p>"
        "<p>Each claim about normalization, measured on real data over several seeds. A verdict "
        "comes from the numbers of these runs only; the literature column says what the "
        "papers report.</p>"
        f"<div class='counts'>{count_html}</div>"
        f"{_verdict_table(entries)}" + "".join(_section(e) for e in entries) + "<footer>Rebuild "
        "this page from the database with <code>normlab report</code>; raw numbers in "
        "<a href='results.json'>results.json</a>.</footer></main>"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>normlab lab report</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>\n<body>{body}</body></html>\n"
    )


_STATUSES = ("supported", "not supported", "inconclusive", "no verdict")


def write_report(
    entries: Sequence[ReportEntry], out_dir: str | Path, *, db: str | Path | None = None
) -> Path:
    """Write ``index.html`` and ``results.json`` into `out_dir` (figures are already there).

    Args:
        entries: from :func:`build_entries`.
        out_dir: the report folder (created if missing).
        db: the database path, shown on the page.

    Returns:
        The path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "db": str(db) if db is not None else None,
        "versions": versions(),
    }
    (out / "results.json").write_text(
        json.dumps(_results_json(entries, meta), indent=1, allow_nan=False) + "\n"
    )
    index = out / "index.html"
    index.write_text(_html(entries, meta), encoding="utf-8")
    return index


# ------------------------------------------------------------------------------------- terminal

_COLOURS = {
    "supported": "green",
    "not supported": "red",
    "inconclusive": "yellow",
    "no verdict": "dim",
}


def print_verdicts(entries: Sequence[ReportEntry], console: Any = None) -> None:
    """Print the verdict table (claim, experiment, verdict in colour, evidence) with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="normlab lab: verdicts", show_lines=False, expand=False)
    table.add_column("claim", style="bold", no_wrap=True)
    table.add_column("experiment", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("evidence")
    for e in entries:
        colour = _COLOURS.get(e.status, "white")
        summary = e.verdict.summary if e.verdict is not None else ""
        evidence = (summary + "\n" if summary else "") + _evidence(e)
        table.add_row(e.claim, e.name, f"[{colour}]{e.status}[/]", evidence)
    console.print(table)
