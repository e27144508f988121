"""``how-met demo --quick`` end to end: museum, every stage, the table on stdout, the report."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import unquote

from how_met import cli
from how_met.pipeline.museum import museum_is_built
from how_met.pipeline.settings import QUICK_SIZE


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]


def test_demo_quick_prints_the_table_and_writes_the_report(tmp_path, capsys):
    work = tmp_path / "how-met-demo"
    assert cli.main(["demo", "--quick", "--work", str(work)]) == 0
    printed = capsys.readouterr().out

    results = json.loads((work / "results.json").read_text())
    table_lines = [line for line in printed.splitlines() if line.lstrip().startswith("|")]
    assert table_lines and "GAP" in table_lines[0], printed
    for method in results["methods"]:
        assert any(method in line for line in table_lines), f"{method} missing from the table"
    assert results["dataset"]["n_queries"] == (QUICK_SIZE["n_queries"]
                                               + QUICK_SIZE["n_distractors"])
    assert museum_is_built(work / "museum", seed=0, **QUICK_SIZE)

    index = work / "report" / "index.html"
    assert index.is_file() and f"report written to {index}" in printed
    assert "done in" in printed
    parser = _Sources()
    parser.feed(index.read_text(encoding="utf-8"))
    assert parser.links
    for link in parser.links:
        assert (index.parent / unquote(link)).is_file(), link
    for method in results["methods"]:
        assert (work / "predictions" / f"{method}.json").is_file()
