"""``how-met report``: a static HTML page of an evaluation that anyone can open offline.

Reads an evaluation work directory (``results.json`` and ``predictions/<method>.json``, as
written by :mod:`how_met.pipeline.evaluate`) and writes ``<work>/report/index.html`` with, beside it,
the figures (PNG, matplotlib's Agg renderer) and ~128 px JPEG thumbnails of every query and
database image it shows. Links are relative, nothing is fetched from the network and no
JavaScript is needed, so the folder can be zipped, mailed or served as it is.
"""
from __future__ import annotations
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional
from urllib.parse import quote

import numpy as np

from ..utils import atomic_path, progress
from .settings import DEFAULT_QUERIES_SHOWN
from .figures import plot_precision, plot_tuning
from .cards import PAGE_SIZE, database_images, failures_first, is_failure, page_name, pager, query_card
from .evidence import EVIDENCE_FILE, read_evidence
from .thumbnails import Thumbnails

logger = logging.getLogger("how_met.report")

FIGURES_DIR = "figures"

# Metrics table: (results key, column heading, format)
METRIC_COLUMNS = (
    ("GAP", "GAP", "{:.1f}"),
    ("GAP-", "GAP-", "{:.1f}"),
    ("ACC", "ACC", "{:.1f}"),
    ("K", "K", "{}"),
    ("t", "t", "{:g}"),
    ("extract_images_per_s", "extraction (images/s)", "{:.1f}"),
    ("query_ms_per_image", "query (ms/image)", "{:.1f}"),
    ("index_mb", "index (MB)", "{:.2f}"),
)
HIGHER_IS_BETTER = {"GAP", "GAP-", "ACC"}


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def format_metric(value, fmt: str) -> str:
    """One table cell: ``fmt`` applied to a number, to each number of a list (per-fold tuning
    gives one K and t per fold), or an em dash when the value is missing."""
    if value is None:
        return "\u2014"
    if isinstance(value, (list, tuple)):
        return " / ".join(format_metric(v, fmt) for v in value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "\u2014"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _slug(name: str) -> str:
    """A file-name-safe, collision-free name: "global+rerank" -> "global-rerank-<hash>"."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "method"
    return f"{base}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:6]}"


def _read_json(path: Path, what: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

CSS = """
:root { --ok: #17803d; --bad: #c62828; --neutral: #6b6b6b; --line: #ddd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1d;
  margin: 0 auto; padding: 0 24px 48px; max-width: 1400px; background: #fafafa; }
header { padding: 18px 0 6px; border-bottom: 2px solid #222; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin: 30px 0 10px; font-size: 19px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
nav a { margin-right: 14px; }
.meta { color: #444; margin: 4px 0; }
table.metrics { border-collapse: collapse; background: #fff; }
table.metrics th, table.metrics td { border: 1px solid var(--line); padding: 5px 10px;
  text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: #f0f0f0; }
table.metrics td.best { font-weight: 700; background: #eef7ef; }
table.metrics td.params, table.metrics th.params { text-align: left; font-size: 12px;
  color: #444; max-width: 260px; }
.note { color: #555; font-size: 13px; max-width: 900px; }
details pre { background: #fff; border: 1px solid var(--line); padding: 8px; font-size: 12px;
  max-height: 320px; overflow: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 0; }
.figures img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figcaption { font-size: 12px; color: #555; }
.query { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
  margin: 0 0 14px; display: grid; grid-template-columns: 1fr; gap: 8px; }
.query-head { display: flex; flex-wrap: wrap; gap: 6px; align-content: flex-start; }
.query-head .caption { font-size: 12px; color: #333; word-break: break-all; max-width: 420px; }
.query-head figure { width: 136px; }
.query-head img, .match img { display: block; border: 2px solid transparent; background: #eee; }
table.matches { border-collapse: collapse; width: 100%; }
table.matches th { text-align: left; vertical-align: top; padding: 4px 10px 4px 0; width: 190px;
  font-weight: 600; white-space: nowrap; }
table.matches td { padding: 4px 0; vertical-align: top; border-top: 1px solid #f0f0f0; }
table.matches tr:first-child td, table.matches tr:first-child th { border-top: none; }
.verdict { display: block; font-weight: 400; font-size: 12px; color: #333; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; color: #fff; font-size: 11px;
  font-weight: 600; }
.badge.correct { background: var(--ok); } .badge.wrong { background: var(--bad); }
.badge.distractor { background: var(--neutral); }
.top { display: flex; gap: 6px; flex-wrap: wrap; }
.match { width: 132px; font-size: 11px; color: #333; }
.match.hit img { border-color: var(--ok); }
.match.predicted:not(.hit) img { border-color: var(--bad); }
.match .score { font-variant-numeric: tabular-nums; }
.empty { color: #888; font-size: 12px; }
.warning { background: #fff4e5; border: 1px solid #f0b15a; padding: 6px 10px; max-width: 900px; }
.query.failure { border-left: 5px solid var(--bad); }
figure.evidence { margin: 0 0 8px; } figure.evidence img { max-width: 100%; height: auto; }
.pager { margin: 8px 0 14px; } .pager a, .pager strong { margin-right: 6px; }
"""


def _chosen_parameters(metrics: dict) -> str:
    """Tuned parameters beyond K and t (e.g. a fusion weight), as "name=value, ..."."""
    known = ({key for key, _, _ in METRIC_COLUMNS} | {f"{key}_std" for key in HIGHER_IS_BETTER}
             | {"per_fold", "per_repeat", "first_query_ms"})
    parts = []
    for key, value in metrics.items():
        if key in known or isinstance(value, (dict, list)):
            continue
        parts.append(f"{key}={format_metric(value, '{:g}')}")
    return ", ".join(parts)


def _metrics_table(methods: Dict[str, dict]) -> str:
    best: Dict[str, float] = {}
    for key in HIGHER_IS_BETTER:
        values = [m.get(key) for m in methods.values() if isinstance(m.get(key), (int, float))]
        if len(values) > 1:
            best[key] = max(values)
    extras = {method: _chosen_parameters(metrics) for method, metrics in methods.items()}
    show_extras = any(extras.values())
    head = "".join(f"<th>{_esc(heading)}</th>" for _, heading, _ in METRIC_COLUMNS)
    if show_extras:
        head += '<th class="params">other tuned parameters</th>'
    rows = []
    for method, metrics in methods.items():
        cells = [f'<th scope="row">{_esc(method)}</th>']
        for key, _, fmt in METRIC_COLUMNS:
            value = metrics.get(key)
            cls = ' class="best"' if key in best and value == best[key] else ""
            text = format_metric(value, fmt)
            if metrics.get(f"{key}_std") is not None:  # a repeated run: mean +- std
                text += " \u00b1 " + format_metric(metrics[f"{key}_std"], fmt)
            cells.append(f'<td data-key="{_esc(key)}"{cls}>{_esc(text)}</td>')
        if show_extras:
            cells.append(f'<td class="params">{_esc(extras[method] or "")}</td>')
        rows.append(f'<tr data-method="{_esc(method)}">{"".join(cells)}</tr>')
    return (f'<table class="metrics" id="metrics-table"><thead><tr><th>method</th>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _dataset_line(dataset: dict, protocol: Optional[str]) -> str:
    def number(key):
        value = dataset.get(key)
        return f"{value:,}" if isinstance(value, int) else _esc(value if value is not None else "?")

    parts = [f"<strong>{_esc(dataset.get('name', 'dataset'))}</strong>:",
             f"{number('n_db')} database images of {number('n_classes')} exhibits;",
             f"{number('n_queries')} queries, of which {number('n_distractors')} are distractors."]
    if protocol:
        parts.append(f"Protocol: {_esc(protocol)}.")
    return " ".join(parts)


def _load_predictions(work_dir: Path, methods: Iterable[str]) -> Dict[str, Optional[List[dict]]]:
    predictions: Dict[str, Optional[List[dict]]] = {}
    for method in methods:
        path = work_dir / "predictions" / f"{method}.json"
        if not path.is_file():
            logger.warning("report: %s missing; %s has no per-query results", path, method)
            predictions[method] = None
            continue
        data = _read_json(path, f"predictions of {method}")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of per-query predictions")
        predictions[method] = data
    return predictions


def write_report(work_dir: "str | Path", out: "str | Path | None" = None,
                 n_queries_shown: Optional[int] = None, page_size: int = PAGE_SIZE) -> Path:
    """Write the HTML report of the evaluation in ``work_dir``; return the path of index.html.

    ``out`` defaults to ``<work_dir>/report``. ``n_queries_shown`` limits the query cards
    (default: all, up to {DEFAULT_QUERIES_SHOWN}), ``page_size`` cards per page (index.html, then
    queries-2.html, ...); the failures of the main method (the recogniser's) come first.
    """
    work_dir = Path(work_dir)
    out = Path(out) if out is not None else work_dir / "report"
    results = _read_json(work_dir / "results.json", "the evaluation's results")
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise ValueError(f"{work_dir / 'results.json'}: no 'methods' object")
    dataset = results.get("dataset") or {}
    methods: Dict[str, dict] = results["methods"]
    image_root = Path(dataset["image_root"]) if dataset.get("image_root") else None
    if image_root is not None and not image_root.is_absolute():
        image_root = (work_dir / image_root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / FIGURES_DIR).mkdir(exist_ok=True)
    predictions = _load_predictions(work_dir, methods)
    title = f"how-met report: {dataset.get('name', work_dir.name)}"
    header = _header_section(title, results, work_dir, out)
    sections = [header, _metrics_section(results), _precision_section(methods, predictions, out),
                _tuning_section(methods, results.get("tuning") or {}, out)]
    main_method = (results.get("recogniser") or {}).get("method") or next(iter(methods), "")
    pages = _queries_pages(methods, predictions, main_method, read_evidence(work_dir / EVIDENCE_FILE),
                           image_root, out, n_queries_shown, page_size)
    for i, queries in enumerate(pages):  # later pages: the header and their cards only
        body = sections + [queries] if i == 0 else [header, queries]
        page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n'
                + "\n".join(body) + "\n</body></html>\n")
        with atomic_path(out / page_name(i)) as tmp:
            tmp.write_text(page, encoding="utf-8")
    return out / page_name(0)


def _header_section(title: str, results: dict, work_dir: Path, out: Path) -> str:
    """Title, dataset line and links (results.json/.md are copied beside the page)."""
    links = ['<a href="#metrics">metrics</a>', '<a href="#precision">precision</a>',
             '<a href="#tuning">tuning</a>', '<a href="#queries">queries</a>']
    for extra in ("results.json", "results.md"):
        if (work_dir / extra).is_file():
            shutil.copyfile(work_dir / extra, out / extra)
            links.append(f'<a href="{extra}">{extra}</a>')
    return (f'<header><h1>{_esc(title)}</h1>'
            f'<p class="meta">{_dataset_line(results.get("dataset") or {}, results.get("protocol"))}</p>'
            f'<nav>{"".join(links)}</nav></header>')


def _metrics_section(results: dict) -> str:
    """The metrics table, the evaluation's notes and its settings."""
    settings = json.dumps(results.get("settings", {}), indent=1, sort_keys=True)
    notes = results.get("notes") or {}
    notes_html = ""
    if isinstance(notes, dict) and notes:
        # a degenerate tuning (every confidence equal) is a warning, not a footnote
        warnings = "".join(f'<p class="warning"><strong>{_esc(key)}</strong>: {_esc(value)}</p>'
                           for key, value in notes.items() if key.endswith("confidence"))
        items = "".join(f"<li><strong>{_esc(key)}</strong>: {_esc(value)}</li>"
                        for key, value in notes.items() if not key.endswith("confidence"))
        notes_html = warnings + (f'<ul class="note">{items}</ul>' if items else "")
    elif isinstance(notes, (list, str)) and notes:
        items = [notes] if isinstance(notes, str) else notes
        notes_html = f'<ul class="note">{"".join(f"<li>{_esc(n)}</li>" for n in items)}</ul>'
    return ('<section id="metrics"><h2>Metrics</h2>'
            f'{_metrics_table(results["methods"])}'
            '<p class="note">GAP: global average precision over all queries sorted by confidence '
            '(distractors included; a distractor is never correct). GAP-: the same without '
            'distractors. ACC: accuracy on queries of exhibits. K and t: the kNN classifier\'s '
            'neighbours and temperature, tuned on held-out queries. Best value of each accuracy '
            f'column in bold.</p>{notes_html}'
            f'<details><summary>settings</summary><pre>{_esc(settings)}</pre></details></section>')


def _precision_section(methods: Dict[str, dict], predictions: Dict[str, Optional[List[dict]]], out: Path) -> str:
    """Precision versus confidence threshold and precision-recall, one line per method."""
    curves = {m: p for m, p in predictions.items() if p}
    if not curves:
        return ('<section id="precision"><h2>Precision versus confidence</h2>'
                '<p class="empty">no per-query predictions</p></section>')
    name = f"{FIGURES_DIR}/precision-confidence.png"
    width, height = plot_precision(curves, {m: methods[m].get("GAP") for m in curves}, out / name)
    return ('<section id="precision"><h2>Precision versus confidence</h2>'
            f'<div class="figures"><figure><img src="{quote(name)}" width="{width}" '
            f'height="{height}" alt="precision versus confidence per method">'
            f'<figcaption style="max-width:{width}px">Left: precision of the queries whose '
            'confidence is at least the threshold; a good classifier stays precise as the '
            'threshold drops, keeping distractors at low confidence. Right: precision-recall '
            'over the same ranking; its area is the GAP.</figcaption></figure></div></section>')


def _tuning_section(methods: Dict[str, dict], tuning: Dict[str, dict], out: Path) -> str:
    """One K x t heatmap per method, all on one colour scale."""
    all_values = []
    for grid in tuning.values():
        try:
            values = np.asarray(grid.get("GAP", []), dtype=np.float64).ravel()
        except (TypeError, ValueError, AttributeError):
            continue
        all_values += values[np.isfinite(values)].tolist()
    shared_range = (min(all_values), max(all_values)) if all_values else None
    figures = []
    for method, grid in tuning.items():
        name = f"{FIGURES_DIR}/tuning-{_slug(method)}.png"
        try:
            width, height = plot_tuning(method, grid, methods.get(method, {}), out / name, shared_range)
        except (ValueError, TypeError) as exc:
            logger.warning("report: no tuning heatmap for %s: %s", method, exc)
            continue
        figures.append(f'<figure><img src="{quote(name)}" width="{width}" height="{height}" '
                       f'alt="tuning heatmap of {_esc(method)}"></figure>')
    if not figures:
        return ('<section id="tuning"><h2>Tuning: GAP over K and t</h2>'
                '<p class="empty">no tuning grids in results.json</p></section>')
    return ('<section id="tuning"><h2>Tuning: GAP over K and t</h2>'
            f'<div class="figures">{"".join(figures)}</div><p class="note">GAP of the tuning '
            'queries for every K and t, at the best value of the method\'s other tuned parameters '
            '(fusion weights) there (averaged over folds under cross-tuning), on one colour scale '
            'for all methods; the setting chosen (per fold) is outlined in red.</p></section>')


def _queries_pages(methods: Dict[str, dict], predictions: Dict[str, Optional[List[dict]]], main_method: str,
                   evidence: dict, image_root: Optional[Path], out: Path, n_queries_shown: Optional[int],
                   page_size: int) -> List[str]:
    """The query cards (up to the limit), failures of the main method first, ``page_size`` per
    page: each with the drawn evidence of its main-method answer and every method's verdict."""
    query_keys: List[str] = []
    by_method: Dict[str, Dict[str, dict]] = {}
    for method, items in predictions.items():
        by_method[method] = {}
        for item in items or []:
            key = str(item.get("query"))
            by_method[method][key] = item
            query_keys.append(key)
    query_keys = list(dict.fromkeys(query_keys))
    limit = DEFAULT_QUERIES_SHOWN if n_queries_shown is None else max(0, int(n_queries_shown))
    main = by_method.get(main_method, {})
    shown = failures_first(query_keys, main)[:limit]
    n_failures = sum(is_failure(main.get(k)) for k in shown)
    thumbs = Thumbnails(image_root, out)
    exhibit_key = database_images(image_root)
    cards = [query_card(key, {m: by_method[m].get(key) for m in methods}, main_method, thumbs, exhibit_key,
                        evidence, image_root, out)
             for key in progress(shown, desc="report: queries", unit="query")]
    if thumbs.missing:
        logger.warning("report: %d images not found under %s; shown as placeholders",
                       len(thumbs.missing), image_root)
    counts = f"{len(shown)} of {len(query_keys)} queries" if len(shown) < len(query_keys) else \
        f"all {len(query_keys)} queries"
    legend = (f'<p class="legend">Showing {_esc(counts)}, failures of {_esc(main_method)} first ({n_failures}: '
              'wrong exhibits and accepted distractors, the most confident first; red edge). The picture: '
              f'the inlier correspondences of spatial verification between the query and {_esc(main_method)}\'s '
              'top candidate. Each row: a method\'s verdict, predicted exhibit, confidence (log-odds: '
              'what GAP ranks by) and accept decision, then its top-5 database matches with scores; '
              '<span style="color:var(--ok)">green</span> border: the query\'s exhibit, '
              '<span style="color:var(--bad)">red</span>: a wrongly predicted exhibit.</p>')
    pages = [cards[i:i + page_size] for i in range(0, len(cards), page_size)] or [[]]
    return [f'<section id="queries"><h2>Queries</h2>{legend}{pager(i, len(pages), page_size)}'
            f'{"".join(page)}{pager(i, len(pages), page_size)}</section>' for i, page in enumerate(pages)]


write_report.__doc__ = write_report.__doc__.replace("{DEFAULT_QUERIES_SHOWN}",
                                                    str(DEFAULT_QUERIES_SHOWN))
