"""The HTML report: built from a fabricated evaluation work directory, checked as files and in a
real headless browser (Debian's chromium; skipped when it is not installed)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from how_met import cli
from how_met.pipeline.evidence import write_evidence
from how_met.pipeline.figures import precision_curve
from how_met.pipeline.photos import skimage_photo
from how_met.pipeline.report import METRIC_COLUMNS, format_metric, write_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
DATASET_NAME = 'fabricated museum <&> "quoted"'
METHODS = ("global", "how-asmk", "fusion", "global+rerank")
MAIN_METHOD = "global+rerank"  # the recogniser's method, whose evidence the cards draw
KS = [1, 2, 3, 5, 7, 10, 15, 20, 50]
TS = [0.01, 0.1, 1, 5, 10, 15, 20, 25, 30, 50, 100, 500]


def _sample_pictures():
    pictures = [skimage_photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")]
    crops = []
    for picture in pictures:
        h, w = picture.shape[:2]
        crops += [picture[: h // 2, : w // 2], picture[h // 2:, w // 2:]]
    return crops


def fabricate_work_dir(root: Path, n_classes: int = 6, n_met_queries: int = 7,
                       n_distractors: int = 3, seed: int = 0) -> Path:
    """An evaluation work dir in the format how_met.pipeline.evaluate writes, over real small images."""
    rng = np.random.default_rng(seed)
    museum = root / "museum"
    images = museum / "images"
    pictures = _sample_pictures()
    database = []
    for label in range(n_classes):
        n_views = 2 if label % 3 == 0 else 1
        for view in range(n_views):
            key = f"db/{label:03d}/{view}.jpg" if view == 0 else f"db/{label:03d}/{view}.png"
            pixels = pictures[label % len(pictures)]
            if view:
                pixels = pixels[10:-10, 10:-10]
            (images / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(pixels)).resize((120, 100)).save(images / key)
            database.append({"id": label, "path": key})
    # One database key whose file is gone: the report must still reference only existing files.
    database.append({"id": n_classes - 1, "path": "db/gone/0.jpg"})
    (museum / "database.json").write_text(json.dumps(database))

    queries = []
    for i in range(n_met_queries + n_distractors):
        label = i % n_classes if i < n_met_queries else -1
        key = f"queries/visitor #{i} & co.jpg"  # characters that need escaping and quoting
        source = pictures[label % len(pictures)] if label >= 0 else pictures[-1 - i % 2][::-1]
        noisy = np.clip(np.asarray(Image.fromarray(np.ascontiguousarray(source)).resize((150, 110)),
                                   np.float32) + rng.normal(0, 12, (110, 150, 3)), 0, 255)
        (images / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.astype(np.uint8)).save(images / key, quality=80)
        queries.append((key, label))

    work = root / "work"
    (work / "predictions").mkdir(parents=True)
    results = {
        "dataset": {"name": DATASET_NAME, "image_root": str(images.resolve()),
                    "n_db": len(database), "n_queries": len(queries),
                    "n_distractors": n_distractors, "n_classes": n_classes},
        "settings": {"backbone": "efficientnet-lite0", "codebook": 256, "scales": [1.0, 0.707]},
        "protocol": "2-fold cross-tuning",
        "methods": {}, "tuning": {},
    }
    evidence = {}
    for m, method in enumerate(METHODS):
        predictions = []
        for key, label in queries:
            ranked = rng.permutation(len(database))[:5]
            skill = 0.35 + 0.15 * m
            if label >= 0 and rng.random() < skill:  # put the right exhibit first
                right = [j for j, e in enumerate(database) if e["id"] == label][0]
                ranked = np.concatenate([[right], [j for j in ranked if j != right]])[:5]
            scores = np.sort(rng.uniform(0.1, 0.9, size=5))[::-1]
            top = [{"key": database[j]["path"], "label": database[j]["id"],
                    "score": round(float(s), 4)} for j, s in zip(ranked, scores)]
            pred = top[0]["label"]
            correct = label >= 0 and pred == label
            conf = float(np.clip(rng.uniform(0.5, 1.0) if correct else rng.uniform(0, 0.7), 0.01, 0.99))
            log_odds = float(np.log(conf / (1 - conf)))
            predictions.append({"query": key, "label": label, "pred": pred, "log_odds": log_odds,
                                "conf": round(conf, 4), "accepted": conf >= 0.6, "correct": bool(correct),
                                "top": top})
            if method == MAIN_METHOD:  # the inlier correspondences with its top candidate
                n = int(rng.integers(4, 40))
                query_xy = rng.uniform([0, 0], [150, 110], size=(n, 2))
                evidence[(key, top[0]["key"])] = {
                    "query_xy": query_xy, "db_xy": query_xy * [120 / 150, 100 / 110] + rng.normal(0, 2, (n, 2)),
                    "inliers": n, "tentative": 3 * n, "global": 0.5, "asmk": 0.00172}
        (work / "predictions" / f"{method}.json").write_text(json.dumps(predictions))
        _, precision, recall = precision_curve(predictions)
        gap = float(np.sum(precision * np.diff(np.concatenate([[0.0], recall])))) * 100
        n_met = sum(label >= 0 for _, label in queries)
        acc = 100.0 * sum(p["correct"] for p in predictions) / n_met
        results["methods"][method] = {
            "GAP": gap, "GAP-": gap + 7.25, "ACC": acc,
            "K": [3, 5] if method == "fusion" else KS[m + 1], "t": [10, 20] if method == "fusion"
            else TS[m + 3], "extract_images_per_s": 4.0 + m, "query_ms_per_image": 1.25 * (m + 1),
            "index_mb": None if method == "fusion" else 0.125 * (m + 1),
            "per_fold": [{"GAP": gap, "K": 3}, {"GAP": gap, "K": 5}]}
        if method == "fusion":
            results["methods"][method]["weight"] = 0.5
        if method == "global+rerank":  # evaluate writes per-fold choices that differ as "a/b"
            results["methods"][method].update({"K": "7/2", "t": "10/0.01"})
        if method != "fusion":
            grid = rng.uniform(0, 60, size=(len(KS), len(TS))).round(2)
            results["tuning"][method] = {"K": KS, "t": TS, "GAP": grid.tolist()}
    results["notes"] = {"global_whitening": "skipped: too few database images",
                        "fusion confidence": "every query has the same confidence (log-odds 3.4)"}
    results["recogniser"] = {"method": MAIN_METHOD}
    write_evidence(work / "evidence.h5", evidence)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / "results.md").write_text("| method | GAP |\n|---|---|\n")
    return work


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    work = fabricate_work_dir(root)
    index = write_report(work)
    return work, index


class _LinkCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append(value)


def test_report_references_only_files_that_exist(built_report):
    work, index = built_report
    assert index == work / "report" / "index.html"
    parser = _LinkCollector()
    parser.feed(index.read_text(encoding="utf-8"))
    assert "script" not in parser.tags and "link" not in parser.tags
    files = [link for link in parser.links if not link.startswith("#")]
    assert len(files) > 40
    for link in files:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (index.parent / unquote(parts.path)).resolve()
        assert target.is_file(), f"{link} -> {target} missing"
        assert index.parent.resolve() in target.parents, f"{link} leaves the report folder"
    for anchor in (link[1:] for link in parser.links if link.startswith("#")):
        assert f'id="{anchor}"' in index.read_text()
    # Every figure and thumbnail is a real PNG/JPEG file.
    for link in {unquote(link) for link in files if link.endswith((".png", ".jpg"))}:
        with Image.open(index.parent / link) as img:
            limit = 2000 if "figures" in link else 1000 if link.startswith("matches/") else 128
            assert img.size[0] > 0 and max(img.size) <= limit


def test_report_content_is_escaped_and_complete(built_report):
    work, index = built_report
    page = index.read_text(encoding="utf-8")
    results = json.loads((work / "results.json").read_text())
    assert DATASET_NAME not in page and "fabricated museum &lt;&amp;&gt; &quot;quoted&quot;" in page
    assert "visitor #0 & co" not in page and "visitor #0 &amp; co" in page
    assert page.count('<article class="query') == results["dataset"]["n_queries"]
    for method in METHODS:
        assert f'data-method="{method}"' in page
    assert (index.parent / "figures").is_dir()
    assert len(list((index.parent / "figures").glob("tuning-*.png"))) == len(results["tuning"])
    assert (index.parent / "figures" / "precision-confidence.png").is_file()
    assert (index.parent / "thumbs" / "missing.png").is_file()  # the gone database image
    assert "global_whitening" in page and "skipped: too few database images" in page
    limited = write_report(work, out=work / "small", n_queries_shown=3)
    assert limited.read_text().count('<article class="query') == 3
    assert "Showing 3 of 10 queries" in limited.read_text()


def test_report_shows_the_spread_of_a_repeated_run(tmp_path):
    work = fabricate_work_dir(tmp_path, seed=1)
    results = json.loads((work / "results.json").read_text())
    results["methods"]["how-asmk"].update({"GAP": 51.25, "GAP_std": 2.5, "ACC_std": 0.0,
                                           "per_repeat": [{"seed": 0, "GAP": 53.75}, {"seed": 1, "GAP": 48.75}]})
    (work / "results.json").write_text(json.dumps(results))
    page = write_report(work).read_text(encoding="utf-8")
    row = page.split('data-method="how-asmk"')[1].split("</tr>")[0]
    assert '<td data-key="GAP">51.2 \u00b1 2.5</td>' in row.replace(' class="best"', "")
    assert "\u00b1 0.0</td>" in row  # ACC: a zero spread is shown, not dropped
    assert "GAP_std" not in row and "per_repeat" not in row  # not listed as tuned parameters
    other = page.split('data-method="global"')[1].split("</tr>")[0]
    assert "\u00b1" not in other  # a method without repeats shows its value alone


def _cards(page: str):
    """(query key, is a failure) of each card, in page order."""
    return [(html.unescape(key), "failure" in css)
            for css, key in re.findall(r'<article class="([^"]*)" data-query="([^"]*)"', page)]


def test_cards_put_failures_first_and_draw_the_evidence(built_report):
    work, index = built_report
    page = index.read_text(encoding="utf-8")
    main = {p["query"]: p for p in json.loads((work / "predictions" / f"{MAIN_METHOD}.json").read_text())}
    shown = _cards(page)
    flags = [failure for _, failure in shown]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    for key, failure in shown:  # a failure: a wrong exhibit, or a distractor it accepted
        p = main[key]
        assert failure == ((p["label"] >= 0 and not p["correct"]) or (p["label"] < 0 and p["accepted"]))
    failed = [main[k]["log_odds"] for k, f in shown if f]
    assert failed == sorted(failed, reverse=True)  # the most confident failure first
    drawings = re.findall(r'<img src="(matches/[^"]+\.jpg)"', page)
    assert len(drawings) == len(main)  # every query: its correspondences with the top candidate
    assert "inliers of" in page and "tentative correspondences" in page
    assert "ASMK 0.00172" in page  # three significant digits, not 0.002
    assert "log-odds" in page
    assert '<p class="warning"><strong>fusion confidence</strong>' in page


def test_report_pages_keep_a_few_thousand_queries_usable(built_report):
    work, _ = built_report
    index = write_report(work, out=work / "paged", page_size=4)
    pages = [index, index.parent / "queries-2.html", index.parent / "queries-3.html"]
    shown = [card for page in pages for card in _cards(page.read_text(encoding="utf-8"))]
    assert [len(_cards(p.read_text(encoding="utf-8"))) for p in pages] == [4, 4, 2]
    assert len({key for key, _ in shown}) == 10
    assert 'href="queries-3.html#queries"' in index.read_text(encoding="utf-8")
    assert "Metrics" not in pages[1].read_text(encoding="utf-8")  # later pages: cards only


def test_report_cli_and_errors(tmp_path, capsys):
    work = fabricate_work_dir(tmp_path, n_classes=3, n_met_queries=3, n_distractors=1)
    assert cli.main(["report", str(work), "--out", str(tmp_path / "out")]) == 0
    assert str(tmp_path / "out" / "index.html") in capsys.readouterr().out
    (work / "results.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        write_report(work)
    message = str(error.value)
    assert "results.json" in message and "\n" not in message
    (work / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        write_report(work)


def test_precision_curve_and_formatting():
    predictions = [
        {"label": 1, "correct": True, "conf": 0.9},
        {"label": -1, "correct": False, "conf": 0.8},   # distractor
        {"label": 2, "correct": True, "conf": 0.7},
        {"label": 3, "correct": False, "conf": 0.1},
    ]
    conf, precision, recall = precision_curve(predictions)
    assert conf.tolist() == [0.9, 0.8, 0.7, 0.1]
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert recall.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert format_metric(25.34, "{:.1f}") == "25.3"
    assert format_metric([3, 5], "{}") == "3 / 5"
    assert format_metric(None, "{:.1f}") == "\u2014"
    assert format_metric(float("nan"), "{:.1f}") == "\u2014"


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------

# Registered before anything loads: records resource and script errors (capture phase, since
# an <img>'s error event does not bubble), then after `load` writes what the page rendered
# into the DOM, which --dump-dom prints.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t !== window ? (t.tagName + ' ' + (t.src || t.href))
                                         : String(e.message));
}, true);
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth}; });
  var table = document.getElementById('metrics-table');
  var rows = Array.prototype.map.call(table.tBodies[0].rows, function (row) {
    return Array.prototype.map.call(row.cells, function (cell) {
      return cell.innerText.trim(); }); });
  var out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({images: images, errors: window.__errors, rows: rows,
    tableHeight: table.getBoundingClientRect().height, title: document.title,
    h1: document.querySelector('h1').innerText});
  document.body.appendChild(out);
});
</script>"""


def _chromium(args, tmp_path, timeout=90):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-extensions", "--mute-audio",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                                             "chromium); the in-browser report check needs it")
def test_report_renders_in_headless_chromium(built_report, tmp_path):
    work, index = built_report
    page = index.read_text(encoding="utf-8")
    assert "<head>" in page
    checked = index.parent / "index.check.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    run = _chromium(["--enable-logging=stderr", "--v=0", "--window-size=1280,1600",
                     "--dump-dom", checked.resolve().as_uri()], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "console messages: " + "\n".join(console)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', run.stdout, re.S)
    assert found, "the page's load event never fired: " + run.stdout[-1000:]
    import html
    rendered = json.loads(html.unescape(found.group(1)))
    assert rendered["errors"] == []
    assert len(rendered["images"]) > 40
    broken = [img for img in rendered["images"] if not img["complete"] or img["width"] <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert rendered["h1"] == f"how-met report: {DATASET_NAME}"

    # The metrics table shows the numbers of results.json, one row per method, in order.
    results = json.loads((work / "results.json").read_text())
    assert rendered["tableHeight"] > 0
    assert [row[0] for row in rendered["rows"]] == list(results["methods"])
    for row, metrics in zip(rendered["rows"], results["methods"].values()):
        expected = [format_metric(metrics[key], fmt) for key, _, fmt in METRIC_COLUMNS]
        assert row[1:len(expected) + 1] == expected
        assert row[1:4] == [f"{metrics[key]:.1f}" for key in ("GAP", "GAP-", "ACC")]
    fusion = dict(zip(["method"] + [key for key, _, _ in METRIC_COLUMNS],
                      rendered["rows"][METHODS.index("fusion")]))
    assert fusion["K"] == "3 / 5" and fusion["index_mb"] == "\u2014"
    assert rendered["rows"][METHODS.index("fusion")][-1] == "weight=0.5"
    rerank = rendered["rows"][METHODS.index("global+rerank")]
    assert rerank[4:6] == ["7/2", "10/0.01"]
    assert rendered["rows"][0][1] == f"{results['methods']['global']['GAP']:.1f}"
    checked.unlink()
