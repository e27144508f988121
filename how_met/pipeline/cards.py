"""The report's query cards: per query its photo, its exhibit, the drawn correspondences with the
top candidate of the main method, and every method's verdict with its top-5 -- failures first,
split into pages so that a few thousand queries stay usable."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from .evidence import draw_matches, pair_name
from .thumbnails import Thumbnails

MATCHES_DIR = "matches"
PAGE_SIZE = 50           # query cards per page


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def score_text(value) -> str:
    """Three significant digits: ASMK scores of 0.0017 and 0.0021 stay apart (0.002 would not)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def confidence_text(prediction: dict) -> str:
    """Confidence with the log-odds it comes from (the confidence saturates at 100%)."""
    conf, log_odds = prediction.get("conf"), prediction.get("log_odds")
    text = f"{100 * conf:.1f}%" if isinstance(conf, (int, float)) else "?"
    return text + (f" (log-odds {log_odds:.3g})" if isinstance(log_odds, (int, float)) else "")


def is_failure(prediction: Optional[dict]) -> bool:
    """A wrong answer about an exhibit, or a distractor accepted as one."""
    if not prediction:
        return False
    if int(prediction.get("label", -1)) < 0:
        return bool(prediction.get("accepted"))
    return not prediction.get("correct")


def failures_first(query_keys: Sequence[str], main: Dict[str, dict]) -> List[str]:
    """Failures of the main method first, the most confident first; then the rest in order."""
    def log_odds(key):
        value = main.get(key, {}).get("log_odds")
        return value if isinstance(value, (int, float)) else float("-inf")
    failed = sorted((k for k in query_keys if is_failure(main.get(k))), key=log_odds, reverse=True)
    chosen = set(failed)
    return failed + [k for k in query_keys if k not in chosen]


def database_images(image_root: Optional[Path]) -> Dict[int, str]:
    """Exhibit -> first database image key, from a ``database.json`` beside the image root."""
    if image_root is None:
        return {}
    for candidate in (image_root.parent / "database.json", image_root / "database.json"):
        try:
            entries = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        labels: Dict[int, str] = {}
        for entry in entries if isinstance(entries, list) else []:
            try:
                labels.setdefault(int(entry["id"]), str(entry["path"]))
            except (KeyError, TypeError, ValueError):
                continue
        return labels
    return {}


def _verdict(prediction: dict) -> Tuple[str, str]:
    """(css class, text) of a prediction."""
    if int(prediction.get("label", -1)) < 0:
        return ("wrong", "distractor accepted") if prediction.get("accepted") else ("distractor", "distractor")
    return ("correct", "correct") if prediction.get("correct") else ("wrong", "wrong")


def _evidence_panel(key: str, main_method: str, prediction: Optional[dict], evidence: dict,
                    image_root: Optional[Path], out_dir: Path) -> str:
    top = (prediction or {}).get("top") or []
    if not top:
        return ""
    candidate = str(top[0].get("key"))
    found = evidence.get((key, candidate))
    if found is None or image_root is None:
        return ""
    name = f"{MATCHES_DIR}/{pair_name(key, candidate)}.jpg"
    size = draw_matches(image_root / key, image_root / candidate, found["query_xy"], found["db_xy"],
                        out_dir / name)
    if size is None:
        return ""
    accepted = "accepted" if prediction.get("accepted") else "rejected"
    return (f'<figure class="evidence"><img src="{quote(name)}" width="{size[0]}" height="{size[1]}" '
            f'alt="inlier correspondences of {_esc(key)} and {_esc(candidate)}">'
            f'<figcaption><strong>{_esc(main_method)}</strong> top candidate: exhibit '
            f'{_esc(top[0].get("label"))} ({_esc(accepted)}) &middot; <strong>{found["inliers"]}</strong> inliers '
            f'of {found["tentative"]} tentative correspondences &middot; global {score_text(found["global"])} '
            f'&middot; ASMK {score_text(found["asmk"])} &middot; {_esc(main_method)} score '
            f'{score_text(top[0].get("score"))}</figcaption></figure>')


def query_card(key: str, per_method: Dict[str, Optional[dict]], main_method: str, thumbs: Thumbnails,
               exhibit_key: Dict[int, str], evidence: dict, image_root: Optional[Path], out_dir: Path) -> str:
    first = next((p for p in per_method.values() if p is not None), {})
    label = int(first.get("label", -1))
    head = [f'<figure>{thumbs.img(key, title=f"query {key}")}'
            '<figcaption>query</figcaption></figure>']
    if label >= 0:
        gt_key = exhibit_key.get(label)
        if gt_key is None:  # no database.json: look for the exhibit among the matches
            gt_key = next((m["key"] for p in per_method.values() if p
                           for m in p.get("top", []) if int(m.get("label", -2)) == label), None)
        if gt_key is not None:
            head.append(f'<figure>{thumbs.img(gt_key, title=f"exhibit {label}: {gt_key}")}'
                        f'<figcaption>ground truth: exhibit {label}</figcaption></figure>')
        truth = f"ground truth: exhibit {label}"
    else:
        truth = "distractor (no exhibit in the database)"
    head.append(f'<div class="caption"><code>{_esc(key)}</code><br>{_esc(truth)}</div>')
    panel = _evidence_panel(key, main_method, per_method.get(main_method), evidence, image_root, out_dir)

    rows = []
    for method, prediction in per_method.items():
        if prediction is None:
            rows.append(f'<tr><th>{_esc(method)}</th><td class="empty">no prediction</td></tr>')
            continue
        css, text = _verdict(prediction)
        pred = prediction.get("pred")
        matches = []
        for rank, match in enumerate(prediction.get("top", [])[:5], 1):
            match_label = int(match.get("label", -2))
            classes = ["match"]
            if label >= 0 and match_label == label:
                classes.append("hit")
            if pred is not None and match_label == int(pred):
                classes.append("predicted")
            match_key = str(match.get("key", ""))
            matches.append(
                f'<figure class="{" ".join(classes)}">'
                f'{thumbs.img(match_key, title=f"#{rank} {match_key} (exhibit {match_label})")}'
                f'<figcaption>#{rank} exhibit {_esc(match_label)}<br>'
                f'<span class="score">score {_esc(score_text(match.get("score")))}</span></figcaption></figure>')
        top = "".join(matches) or '<span class="empty">no matches</span>'
        decision = "" if "accepted" not in prediction else \
            ("accepted" if prediction["accepted"] else "rejected (below the accept threshold)")
        rows.append(
            f'<tr data-method="{_esc(method)}"><th>{_esc(method)}'
            f'<span class="verdict"><span class="badge {css}">{_esc(text)}</span> '
            f'predicted exhibit {_esc(pred)}<br>confidence {_esc(confidence_text(prediction))}'
            f'<br>{_esc(decision)}</span></th>'
            f'<td><div class="top">{top}</div></td></tr>')
    css = "query failure" if is_failure(per_method.get(main_method)) else "query"
    return (f'<article class="{css}" data-query="{_esc(key)}"><div class="query-head">'
            f'{"".join(head)}</div><div>{panel}<table class="matches">{"".join(rows)}</table></div></article>')


def page_name(page: int) -> str:
    return "index.html" if page == 0 else f"queries-{page + 1}.html"


def pager(page: int, n_pages: int, page_size: int = PAGE_SIZE) -> str:
    if n_pages <= 1:
        return ""
    links = [f'<strong>{i + 1}</strong>' if i == page else
             f'<a href="{page_name(i)}#queries">{i + 1}</a>' for i in range(n_pages)]
    return f'<nav class="pager">pages of {page_size} queries: {" ".join(links)}</nav>'
