"""Met-size benchmark of the streaming pipeline: every stage from the codebook to the rerank.

    python eval/bench_scale.py --images 397121 --queries 21484 --json met.json   # the full Met
    python eval/bench_scale.py --images 2000 --queries 50 --json small.json      # smaller runs
    python eval/bench_scale.py --fit a.json b.json c.json --json fit.json        # fit the growth
    python eval/bench_scale.py --disk none,int8,full,pq16x6 --images 2000        # bytes per record kind

Synthetic local features with Met statistics (``eval/bench_asmk.py``'s generator: 128-D
descriptors around 65,536 word centres with Zipf-like word popularity, 1,000 descriptors on ~700
distinct words per image; queries re-observe 600 descriptors of one database image with extra
noise plus 400 clutter descriptors; geometry: feature-map cells of a 32 x 32 map at scales 1,
0.707, 0.5, a planted feature seen at the cell of its database feature), one class per ~1.77
images as in the Met (397,121 images of 224,408 classes), 512-D global descriptors (a query's
is its target's plus noise).

Stages (each: wall seconds, peak RSS of the process during the stage, bytes it leaves on disk):
- ``codebook``: faiss k-means of ``--words`` words on descriptors of the sample
  (``--train-points`` descriptors, ``--codebook-iterations``); its cost grows with points x words
  x iterations, not with the database (the full recipe: 256 points per word, 10 iterations).
  The index uses the generator's word centres, so that planted matches have a known answer.
- ``records``: every database image aggregated (1 assignment) and its compact record
  (``--record-descriptors``, default int8; ``pq``: ``--pq-code`` MxB, the quantiser
  trained on the codebook sample) appended, its aggregated vectors to the records' sidecar, as
  ``how-met index --records`` streams it. ``disk_gb`` is the records file (what stays);
  ``vectors_gb`` the sidecar (read by the index stage, deletable after it).
  Database quantisation is measured on ``--quantise-images`` images and extrapolated (the
  records hold the generating word of each descriptor; ``db_quantise_s_per_image`` is printed
  and its extrapolated total is a separate line): quantising 397M descriptors exactly costs
  ~1.7 s per image on one core here, longer than everything else together.
- ``index``: the inverted file assembled on disk from the records (``index_from_records``).
- ``asmk_query``: every query quantised (5 assignments, exact), aggregated, searched (top 100),
  32 per batch; ``top1`` = fraction of queries whose planted image ranks first.
- ``global``: exact inner-product search (faiss) of the 512-D global descriptors, top 100.
- ``knn``: the kNN classifier (K = 5, t = 10) over the ASMK neighbours.
- ``rerank``: the ASMK top-``--shortlist`` of ``--rerank-queries`` queries scored and spatially
  verified from the records, the ASMK codes looked up in the index; ``records_read`` and
  ``bytes_read`` give its record I/O, ``index_lookups`` the (image, word) codes read from the
  index's postings.

``--json PATH`` writes {"images", "queries", "top1", "stages": {stage: {"seconds",
"peak_rss_gb", "disk_gb"}}, ...}. ``--fit`` reads several such files (at least three sizes),
fits each stage's seconds, peak RSS and disk as a + b * size (per query for the query stages)
and extrapolates to the Met (397,121 images, 21,484 queries, rerank of 1,000 queries): an
extrapolation, printed as such.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_asmk import MET_IMAGES, SyntheticMuseum  # noqa: E402
from how_met.asmk.aggregation import aggregate  # noqa: E402
from how_met.asmk.codebook import Codebook  # noqa: E402
from how_met.asmk.indexing import index_from_records  # noqa: E402
from how_met.asmk.query import query_descriptors  # noqa: E402
from how_met.asmk.records import RecordStore, records_settings, vectors_path  # noqa: E402
from how_met.features.store import LocalFeatures  # noqa: E402
from how_met.recognition.global_search import global_search  # noqa: E402
from how_met.recognition.knn import knn_predict  # noqa: E402
from how_met.utils import configure_threads, l2_normalise  # noqa: E402

MET_QUERIES = 21_484
MET_CLASSES = 224_408
MET_RERANK_QUERIES = 1_000
GLOBAL_DIM = 512
SCALES = np.array([1.0, 0.707, 0.5], np.float32)
MAP_CELLS = 32
STRIDE = 16
BATCH = 64  # database images generated together (a query's target is regenerated with its batch)
QUERY_BATCH = 32


class Stage:
    """Wall time, peak RSS (the kernel's high-water mark, reset at the start) and disk of a stage."""

    def __init__(self, results: dict, name: str, disk=()):
        self.results, self.name, self.disk = results, name, disk

    def __enter__(self):
        reset_peak_rss()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.results[self.name] = {"seconds": time.perf_counter() - self.started,
                                       "peak_rss_gb": peak_rss_gb(),
                                       "disk_gb": sum(disk_bytes(p) for p in self.disk) / 2 ** 30}


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class MetStatistics(SyntheticMuseum):
    """bench_asmk's generator plus geometry, classes and global descriptors."""

    def geometry(self, image: int, n: int):
        rng = np.random.default_rng((self.seed, 3, image))
        return (rng.integers(0, MAP_CELLS, (n, 2)).astype(np.int16),
                SCALES[rng.integers(0, len(SCALES), n)])

    def features(self, image: int, desc: np.ndarray) -> LocalFeatures:
        locations, scales = self.geometry(image, len(desc))
        side = MAP_CELLS * STRIDE
        return LocalFeatures(desc, np.linspace(1.0, 0.1, len(desc), dtype=np.float32), locations, scales,
                             (side, side), (side, side))

    def planted_query(self, j: int, target: LocalFeatures) -> LocalFeatures:
        rng = np.random.default_rng((self.seed, 2, j))
        n = len(target)
        n_planted = n * 3 // 5  # 600 of 1,000
        chosen = rng.choice(n, n_planted, replace=False)
        planted = target.descriptors[chosen] + self.query_noise * self.pool[rng.integers(0, len(self.pool), n_planted)]
        clutter = self.centroids[self._words(rng, n - n_planted)] + \
            self.db_noise * self.pool[rng.integers(0, len(self.pool), n - n_planted)]
        locations, scales = self.geometry(10 ** 9 + j, n - n_planted)
        side = MAP_CELLS * STRIDE
        return LocalFeatures(np.concatenate([planted, clutter]).astype(np.float32), np.ones(n, np.float32),
                             np.concatenate([target.locations[chosen], locations]),
                             np.concatenate([target.scales[chosen], scales]), (side, side), (side, side))

    def global_descriptors(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 4, start))
        g = rng.standard_normal((stop - start, GLOBAL_DIM)).astype(np.float32)
        return g / np.linalg.norm(g, axis=1, keepdims=True)


def write_records(data, n_images: int, descriptors: int, records_path: Path, settings: dict, pq_sample) -> float:
    """Every database image's record (its aggregated vectors to the sidecar), as ``how-met index
    --records`` streams them; returns the seconds spent generating the synthetic features."""
    generate_s = 0.0
    with RecordStore(records_path, "a", settings, pq_training=lambda: pq_sample) as records:
        for start in range(0, n_images, BATCH):
            stop = min(n_images, start + BATCH)
            t0 = time.perf_counter()
            desc, words, image = data.database_batch(start, stop)
            generate_s += time.perf_counter() - t0
            agg = aggregate(desc, words, data.centroids, image)
            bounds = np.searchsorted(agg.images, np.arange(stop - start + 1))
            for i in range(stop - start):
                sl = slice(i * descriptors, (i + 1) * descriptors)
                records.write(f"db/{start + i:06d}", data.features(start + i, desc[sl]), words[sl],
                              agg.words[bounds[i]:bounds[i + 1]], agg.vectors[bounds[i]:bounds[i + 1]])
            records.flush()
    return generate_s


def disk(args) -> dict:
    """Bytes on disk of every record kind of ``--disk`` (records, their sidecar, the index), at
    ``--images`` / 2 and ``--images`` images, fitted as a + b * images (the pq quantiser's
    header is the a) and extrapolated to the Met. No codebook is trained: the generator's word
    centres quantise, the pq quantiser learns from the first images' descriptors."""
    configure_threads(args.threads)
    data = MetStatistics(args.words, seed=args.seed, descriptors=args.descriptors,
                         words_per_image=args.descriptors * 7 // 10)
    codebook = Codebook.from_centroids(data.centroids)
    pq_sample = l2_normalise(data.database_batch(0, max(1, 65_536 // args.descriptors))[0])
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-disk-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [args.images // 2, args.images]
    out = {"images": MET_IMAGES, "measured_sizes": sizes, "descriptors_per_image": args.descriptors,
           "words": args.words, "disk": {}}
    for kind in args.disk.split(","):
        descriptors, code = ("pq", kind[2:] or None) if kind.startswith("pq") else (kind, None)
        measured = []
        for n in sizes:
            records_path, index_path = work / f"{kind}-{n}.records", work / f"{kind}-{n}.index"
            settings = records_settings(codebook, descriptors, {"stride": STRIDE}, None, code)
            write_records(data, n, args.descriptors, records_path, settings, pq_sample)
            index_from_records(records_path, index_path, show_progress=False)
            measured.append([disk_bytes(p) for p in (records_path, vectors_path(records_path), index_path)])
            for p in (records_path, vectors_path(records_path)):
                p.unlink()
            shutil.rmtree(index_path)
        (r0, v0, i0), (r1, v1, i1) = measured
        per_image = [(b - a) / (sizes[1] - sizes[0]) for a, b in ((r0, r1), (v0, v1), (i0, i1))]
        met = [a + (b - a) / (sizes[1] - sizes[0]) * (MET_IMAGES - sizes[0]) for a, b in ((r0, r1), (v0, v1), (i0, i1))]
        out["disk"][kind] = {"record_bytes_per_image": per_image[0], "vectors_bytes_per_image": per_image[1],
                             "index_bytes_per_image": per_image[2], "met_records_gib": met[0] / 2 ** 30,
                             "met_vectors_gib": met[1] / 2 ** 30, "met_index_gib": met[2] / 2 ** 30,
                             "met_index_plus_records_gib": (met[0] + met[2]) / 2 ** 30,
                             "met_index_plus_records_gb": (met[0] + met[2]) / 1e9}
        print(kind, json.dumps({k: round(v, 2) for k, v in out["disk"][kind].items()}), flush=True)
    return out


def run(args) -> dict:
    threads = configure_threads(args.threads)
    data = MetStatistics(args.words, seed=args.seed, descriptors=args.descriptors,
                         words_per_image=args.descriptors * 7 // 10)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    records_path, index_path = work / "db.records", work / "index"
    vectors = vectors_path(records_path)
    for old in (records_path, vectors):  # a fresh build every run
        if old.exists():
            old.unlink()
    stages: dict = {}
    result = {"images": args.images, "queries": args.queries, "words": args.words, "threads": threads,
              "descriptors_per_image": args.descriptors, "record_descriptors": args.record_descriptors,
              "pq_code": args.pq_code,
              "stages": stages}
    n_images = args.images
    labels = (np.arange(n_images) * MET_CLASSES // MET_IMAGES).astype(np.int64)  # ~1.77 images per class

    # -- codebook on the sample --------------------------------------------------------------------
    sample_images = max(1, -(-args.train_points // args.descriptors))
    sample = np.concatenate([data.database_batch(s, min(s + BATCH, sample_images))[0]
                             for s in range(0, sample_images, BATCH)])[:args.train_points]
    with Stage(stages, "codebook", [work / "codebook.npz"]):
        trained = Codebook(size=args.words, iterations=args.codebook_iterations, seed=args.seed,
                           max_descriptors=len(sample))
        trained.train(sample, show_progress=False, recall_sample=0)
        trained.save(work / "codebook.npz")
    result["codebook"] = {"points": int(len(sample)), "iterations": args.codebook_iterations}
    pq_sample = l2_normalise(sample[:65_536])  # pq records: their quantiser learns from the sample too
    del sample, trained
    codebook = Codebook.from_centroids(data.centroids)

    # -- database quantisation: measured on a sample of images -----------------------------------
    desc, words, _ = data.database_batch(0, args.quantise_images)
    started = time.perf_counter()
    assigned = codebook.assign(desc, 1)[:, 0]
    result["db_quantise_s_per_image"] = (time.perf_counter() - started) / args.quantise_images
    result["db_quantise_agreement"] = float(np.mean(assigned == words))
    del desc, words, assigned

    # -- records: stream every image into its compact record ---------------------------------------
    rng = np.random.default_rng(args.seed)
    targets = np.sort(rng.choice(n_images, args.queries, replace=args.queries > n_images))
    settings = records_settings(codebook, args.record_descriptors, {"stride": STRIDE}, None,
                                args.pq_code if args.record_descriptors == "pq" else None)
    with Stage(stages, "records", [records_path]):
        generate_s = write_records(data, n_images, args.descriptors, records_path, settings, pq_sample)
    stages["records"]["seconds"] -= generate_s
    stages["records"]["vectors_gb"] = disk_bytes(vectors) / 2 ** 30
    del pq_sample
    result["generate_seconds"] = generate_s
    result["record_bytes_per_image"] = disk_bytes(records_path) / n_images
    result["vectors_bytes_per_image"] = disk_bytes(vectors) / n_images

    # -- inverted file assembled from the records ---------------------------------------------------
    with Stage(stages, "index", [index_path]):
        index = index_from_records(records_path, index_path, show_progress=False)
    result["index_bytes_per_image"] = disk_bytes(index_path) / n_images
    result["index_plus_records_gb"] = (disk_bytes(index_path) + disk_bytes(records_path)) / 2 ** 30

    # -- queries (planted matches) -----------------------------------------------------------------
    query_features = []
    for t in targets:
        start = int(t) // BATCH * BATCH
        desc = data.database_batch(start, min(n_images, start + BATCH))[0]
        own = desc[(int(t) - start) * args.descriptors:(int(t) - start + 1) * args.descriptors]
        query_features.append(data.planted_query(len(query_features), data.features(int(t), own)))
    query_keys = [f"q/{j:06d}" for j in range(len(targets))]
    query_timings: dict = {}
    with Stage(stages, "asmk_query"):
        parts = [query_descriptors(index, codebook, [q.descriptors for q in query_features[a:a + QUERY_BATCH]],
                                   query_keys[a:a + QUERY_BATCH], k=args.k, timings=query_timings)
                 for a in range(0, len(query_features), QUERY_BATCH)]
    stages["asmk_query"].update({f"{part}_s": query_timings[part] for part in ("quantise", "aggregate", "search")})
    indices = np.concatenate([p.indices for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    result["top1"] = float(np.mean(indices[:, 0] == targets))

    db_global = np.concatenate([data.global_descriptors(s, min(n_images, s + 4096)) for s in range(0, n_images, 4096)])
    noise = np.random.default_rng((args.seed, 5)).standard_normal((len(targets), GLOBAL_DIM)).astype(np.float32)
    q_global = db_global[targets] + 0.03 * noise
    q_global /= np.linalg.norm(q_global, axis=1, keepdims=True)
    with Stage(stages, "global"):
        g_indices, _ = global_search(db_global, q_global, args.k)
    result["global_top1"] = float(np.mean(g_indices[:, 0] == targets))
    del db_global

    with Stage(stages, "knn"):
        predicted = knn_predict(indices, scores, labels, K=5, t=10.0, n_classes=int(labels[-1]) + 1)
    result["knn_accuracy"] = float(np.mean(predicted.labels == labels[targets]))

    # -- rerank the shortlist of a subset of queries, reading only their records --------------------
    from how_met.verify.reranker import Reranker
    n_rerank = min(args.rerank_queries, len(targets))
    db_keys = index.slot_keys
    with Stage(stages, "rerank"):
        with Reranker(records_path, codebook, index=index) as rr:
            verified_first = 0
            for j in range(n_rerank):
                keys = [db_keys[i] for i in indices[j, :args.shortlist] if i >= 0]
                verify = args.record_descriptors != "none"  # "none": ASMK scores only
                asmk, inliers, _ = rr.score_candidates(query_features[j], keys, verify=verify)
                best = inliers if verify else asmk
                verified_first += keys[int(np.argmax(best))] == f"db/{int(targets[j]):06d}"
            result["rerank"] = {"queries": n_rerank, "shortlist": args.shortlist,
                                "records_read": rr.store.records_read, "bytes_read": rr.store.bytes_read,
                                "index_lookups": rr.index_lookups,
                                "most_inliers_is_planted": verified_first / max(n_rerank, 1)}
    for name, count in (("asmk_query", len(targets)), ("global", len(targets)), ("knn", len(targets)),
                        ("rerank", n_rerank)):
        stages[name]["per_query_s"] = stages[name]["seconds"] / max(count, 1)
    return result


# -- fitting the growth over several sizes ---------------------------------------------------------------

def fit(paths) -> dict:
    """Extrapolate each stage to the Met with the model of how it grows: records and index
    a + b * images; per query, the search (ASMK postings, global flat search) b * images, and
    what does not depend on the database (query quantisation and aggregation, kNN, rerank of a
    fixed shortlist) the mean over the runs; k-means by points x iterations. Peak RSS and disk:
    a + b * images."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["images"])
    if len({r["images"] for r in runs}) < 3:
        raise SystemExit("--fit needs runs at three or more database sizes")
    sizes = np.array([r["images"] for r in runs], np.float64)
    out = {"extrapolation": True, "fitted_sizes": sizes.astype(int).tolist(), "images": MET_IMAGES,
           "queries": MET_QUERIES, "rerank_queries": MET_RERANK_QUERIES, "stages": {}}

    def linear(values) -> float:
        b, a = np.polyfit(sizes, np.asarray(values, np.float64), 1)
        return float(a + b * MET_IMAGES)

    def proportional(values) -> float:
        values = np.asarray(values, np.float64)
        return float(values @ sizes / (sizes @ sizes) * MET_IMAGES)

    def per_query(stage, key="seconds"):
        return [r["stages"][stage][key] / r["queries"] for r in runs]

    last = runs[-1]
    full_points = min(20_000 * last["descriptors_per_image"], 256 * last["words"])
    seconds = {
        "codebook": last["stages"]["codebook"]["seconds"] * full_points * 10
        / (last["codebook"]["points"] * last["codebook"]["iterations"]),
        "records": linear([r["stages"]["records"]["seconds"] for r in runs]),
        "index": linear([r["stages"]["index"]["seconds"] for r in runs]),
        "asmk_query": MET_QUERIES * (float(np.mean(per_query("asmk_query", "quantise_s")))
                                     + float(np.mean(per_query("asmk_query", "aggregate_s")))
                                     + proportional(per_query("asmk_query", "search_s"))),
        "global": MET_QUERIES * proportional(per_query("global")),
        "knn": MET_QUERIES * float(np.mean(per_query("knn"))),
        "rerank": MET_RERANK_QUERIES * float(np.mean([r["stages"]["rerank"]["per_query_s"] for r in runs])),
    }
    for stage, value in seconds.items():
        out["stages"][stage] = {"seconds": value,
                                "peak_rss_gb": linear([r["stages"][stage]["peak_rss_gb"] for r in runs]),
                                "disk_gb": linear([r["stages"][stage]["disk_gb"] for r in runs])}
    out["asmk_search_ms_per_query"] = 1000 * proportional(per_query("asmk_query", "search_s"))
    out["db_quantise_seconds"] = float(np.mean([r["db_quantise_s_per_image"] for r in runs])) * MET_IMAGES
    out["codebook_points"] = full_points
    rerank = last["rerank"]
    out["rerank_mb_read"] = rerank["bytes_read"] / rerank["queries"] * MET_RERANK_QUERIES / 2 ** 20
    out["rerank_index_lookups"] = rerank.get("index_lookups", 0) / rerank["queries"] * MET_RERANK_QUERIES
    out["record_bytes_per_image"] = last["record_bytes_per_image"]
    out["index_bytes_per_image"] = last["index_bytes_per_image"]
    if all("vectors_gb" in r["stages"]["records"] for r in runs):
        out["stages"]["records"]["vectors_gb"] = linear([r["stages"]["records"]["vectors_gb"] for r in runs])
        out["vectors_bytes_per_image"] = last["vectors_bytes_per_image"]
    out["index_plus_records_gb"] = out["stages"]["records"]["disk_gb"] + out["stages"]["index"]["disk_gb"]
    return out


def print_table(result: dict) -> None:
    title = "EXTRAPOLATION (fit a + b * images over " + ", ".join(f"{n:,}" for n in result["fitted_sizes"]) + \
        " images)" if result.get("extrapolation") else "measured"
    print(f"# {result['images']:,} images, {result['queries']:,} queries: {title}")
    print("| stage | seconds | peak RSS GB | disk GB |\n|---|---:|---:|---:|")
    for stage, v in result["stages"].items():
        print(f"| {stage} | {v['seconds']:,.1f} | {v['peak_rss_gb']:.2f} | {v['disk_gb']:.3f} |")
    extra = {k: v for k, v in result.items() if k not in ("stages", "fitted_sizes")}
    print(json.dumps(extra))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=MET_IMAGES, help="database images")
    p.add_argument("--queries", type=int, default=MET_QUERIES, help="query images (planted matches)")
    p.add_argument("--words", type=int, default=65_536, help="visual words")
    p.add_argument("--descriptors", type=int, default=1000, help="descriptors per image")
    p.add_argument("--train-points", type=int, default=256 * 65_536,
                   help="k-means training descriptors (the full recipe: 256 per word)")
    p.add_argument("--codebook-iterations", type=int, default=10, help="k-means iterations")
    p.add_argument("--quantise-images", type=int, default=100, help="database images quantised for timing")
    p.add_argument("--record-descriptors", choices=("int8", "pq", "full", "none"), default="int8")
    p.add_argument("--pq-code", default="8x8", help="with --record-descriptors pq: sub-quantisers x bits")
    p.add_argument("--rerank-queries", type=int, default=MET_RERANK_QUERIES, help="queries reranked")
    p.add_argument("--shortlist", type=int, default=100, help="candidates reranked per query")
    p.add_argument("-k", type=int, default=100, help="neighbours per query")
    p.add_argument("--threads", type=int, help="threads (default: how_met.utils.free_cores())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the records and the index (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--fit", type=Path, nargs="+", help="fit and extrapolate these --json results instead")
    p.add_argument("--disk", metavar="KINDS",
                   help="only the bytes on disk of these record kinds (e.g. none,int8,full,pq16x8,pq16x6) at "
                        "--images / 2 and --images images, extrapolated to the Met")
    args = p.parse_args(argv)
    if args.disk:
        result = disk(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    result = fit(args.fit) if args.fit else run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
