"""eval/bench_scale.py at a tiny size: every stage runs, planted matches are found, the JSON has
the documented shape and the growth fit extrapolates (no timing assertions)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_scale  # noqa: E402

STAGES = {"codebook", "records", "index", "asmk_query", "global", "knn", "rerank"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-scale")
    paths = []
    for images in (60, 90, 120):
        path = tmp / f"{images}.json"
        bench_scale.main(["--images", str(images), "--queries", "6", "--words", "128", "--descriptors", "200",
                          "--train-points", "4000", "--codebook-iterations", "1", "--quantise-images", "2",
                          "--rerank-queries", "2", "--shortlist", "10", "-k", "10", "--threads", "1",
                          "--work", str(tmp / f"work-{images}"), "--json", str(path)])
        paths.append(path)
    return paths


def test_every_stage_is_measured_and_planted_matches_rank_first(runs):
    result = json.loads(runs[-1].read_text())
    assert result["images"] == 120 and result["queries"] == 6
    assert set(result["stages"]) == STAGES
    for stage in result["stages"].values():
        assert stage["seconds"] >= 0 and stage["peak_rss_gb"] > 0 and stage["disk_gb"] >= 0
    assert result["stages"]["records"]["disk_gb"] > 0 and result["stages"]["index"]["disk_gb"] > 0
    assert result["top1"] == 1.0 and result["global_top1"] == 1.0
    rerank = result["rerank"]
    assert rerank["most_inliers_is_planted"] == 1.0
    assert 0 < rerank["records_read"] <= rerank["queries"] * rerank["shortlist"]  # the shortlists only
    assert rerank["index_lookups"] > 0  # the ASMK codes come from the index
    # 200 features, int8 descriptors: 2 + 2 + 1 + 1 + 128 + 4 bytes each, ~0.4 KB of header;
    # the aggregated vectors (18 bytes each; 20 in the index) are in the sidecar, not the records
    assert 27_600 < result["record_bytes_per_image"] < 28_600
    assert 0.8 < result["vectors_bytes_per_image"] / result["index_bytes_per_image"] < 1.1
    assert result["index_plus_records_gb"] > 0


def test_pq_records_are_measured(tmp_path):
    path = tmp_path / "pq.json"
    bench_scale.main(["--images", "40", "--queries", "3", "--words", "128", "--descriptors", "200",
                      "--train-points", "4000", "--codebook-iterations", "1", "--quantise-images", "2",
                      "--rerank-queries", "2", "--shortlist", "10", "-k", "10", "--threads", "1",
                      "--record-descriptors", "pq", "--pq-code", "8x8", "--work", str(tmp_path / "w"),
                      "--json", str(path)])
    result = json.loads(path.read_text())
    # 200 features x (2 + 2 + 1 + 1 + 8) bytes, ~0.4 KB of header, the quantiser's header (~175 KB) shared by 40
    assert 200 * 14 < result["record_bytes_per_image"] < 200 * 14 + 400 + 180_000 / 40
    assert result["rerank"]["most_inliers_is_planted"] == 1.0 and result["top1"] == 1.0


def test_fit_extrapolates_to_the_met(runs, tmp_path, capsys):
    bench_scale.main(["--fit", *map(str, runs), "--json", str(tmp_path / "fit.json")])
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["extrapolation"] is True and fit["images"] == 397_121 and fit["fitted_sizes"] == [60, 90, 120]
    assert set(fit["stages"]) == STAGES
    assert fit["stages"]["records"]["disk_gb"] > json.loads(runs[-1].read_text())["stages"]["records"]["disk_gb"]
    assert "EXTRAPOLATION" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="three"):
        bench_scale.fit(runs[:2])


def test_disk_of_every_record_kind(tmp_path):
    path = tmp_path / "disk.json"
    bench_scale.main(["--disk", "none,int8,pq16x6", "--images", "40", "--words", "128", "--descriptors", "200",
                      "--threads", "1", "--work", str(tmp_path / "w"), "--json", str(path)])
    disk = json.loads(path.read_text())["disk"]
    per_feature = {"none": 6, "int8": 6 + 128 + 4, "pq16x6": 6 + 12}  # word, cell, scale, attention + descriptor
    for kind, size in per_feature.items():
        assert 200 * size < disk[kind]["record_bytes_per_image"] < 200 * size + 500  # + the record's header
        assert disk[kind]["met_index_plus_records_gib"] == pytest.approx(
            disk[kind]["met_records_gib"] + disk[kind]["met_index_gib"])
    assert disk["none"]["vectors_bytes_per_image"] == disk["pq16x6"]["vectors_bytes_per_image"] > 0
