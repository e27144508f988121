"""Benchmark of the ASMK engine (how-met) against the reference package asmk 0.1.1.

    python eval/bench_asmk.py            # codebook 65,536, databases of 2k / 10k / 40k images
    python eval/bench_asmk.py --small    # codebook 8,192, databases of 1k / 2k / 5k images

Synthetic, structured data with a known answer:
- 128-D centroids drawn from a mixture (16 words per component, anisotropic spread), so
  nearest-word search is not trivially easy;
- a database image has 1,000 descriptors on ~700 distinct words (Zipf-like word popularity,
  some words repeated within the image), each descriptor = its word's centroid + noise;
- a query re-observes 600 descriptors of one database image (among the first 1,000, so the
  answer exists at every size) with extra noise, plus 400 clutter descriptors.

What is timed
- Queries (both systems, same descriptors, same thread count): quantisation with multiple
  assignment 5, aggregation, search (top 100). how-met processes queries 32 per call (as
  ``how-met query`` does); the reference one at a time (its API); the two alternate every 32
  queries so that both run under the same machine load.
- Build: aggregation + insertion of every database image (measured). Database quantisation is
  measured on ``--quantise-images`` images and extrapolated: quantising 40M descriptors would
  dominate the run and does not depend on the index. The index therefore holds the generating
  word of each database descriptor; the measured agreement of that word with the codebook's
  nearest word is printed (the noise is chosen so that they nearly always agree).
- The reference index holds the very same database postings (converted to its layout); its own
  build cost is measured on ``--ref-build-images`` images and extrapolated.
- Bytes: how-met postings (codes + image ids) per aggregated vector, and everything (postings,
  word offsets, per-image arrays, keys) per image; the reference's arrays likewise (its Python
  objects and growth slack not counted, so its figure is a lower bound).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from how_met.asmk.aggregation import aggregate  # noqa: E402
from how_met.asmk.codes import unpack_signs  # noqa: E402
from how_met.asmk.codebook import Codebook, quantisation_recall  # noqa: E402
from how_met.asmk.inverted_file import InvertedFile  # noqa: E402
from how_met.asmk.query import query_descriptors  # noqa: E402
from how_met.asmk.settings import SEARCH_METHODS  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402

MET_IMAGES = 397_121
DIM = 128


# -- synthetic data ---------------------------------------------------------------------------------

class SyntheticMuseum:
    """Deterministic generator of database images and planted-match queries."""

    def __init__(self, n_words: int, seed: int = 0, descriptors: int = 1000, words_per_image: int = 700,
                 words_per_component: int = 16, db_noise: float = 0.3, query_noise: float = 0.15):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.n_desc = descriptors
        self.words_per_image = words_per_image
        self.scale = np.linspace(1.0, 0.3, DIM).astype(np.float32)
        components = max(1, n_words // words_per_component)
        means = rng.standard_normal((components, DIM)).astype(np.float32)
        comp = rng.integers(0, components, n_words)
        self.centroids = (means[comp] + 0.7 * rng.standard_normal((n_words, DIM)).astype(np.float32)
                          * self.scale).astype(np.float32)
        weights = 1.0 / np.sqrt(np.arange(n_words) + 10.0)  # Zipf-like popularity of words
        self.word_of_rank = rng.permutation(n_words)
        self.cdf = np.cumsum(weights / weights.sum())
        self.pool = rng.standard_normal((1 << 18, DIM)).astype(np.float32) * self.scale  # noise rows
        self.db_noise, self.query_noise = db_noise, query_noise

    def _words(self, rng, n):
        return self.word_of_rank[np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)]

    def database_batch(self, start: int, stop: int):
        """(descriptors (B*n, 128), generating words (B*n,), image index (B*n,)) of images start..stop."""
        rng = np.random.default_rng((self.seed, 1, start))
        b, n, m = stop - start, self.n_desc, self.words_per_image
        base = self._words(rng, b * m).reshape(b, m)
        extra = np.take_along_axis(base, rng.integers(0, m, (b, n - m)), axis=1)  # bursts
        words = np.concatenate([base, extra], axis=1).ravel()
        desc = self.centroids[words]
        desc += self.db_noise * self.pool[rng.integers(0, len(self.pool), len(words))]
        return desc, words, np.repeat(np.arange(b), n)

    def query(self, j: int, target_desc: np.ndarray):
        rng = np.random.default_rng((self.seed, 2, j))
        planted = target_desc[rng.choice(len(target_desc), 600, replace=False)]
        planted = planted + self.query_noise * self.pool[rng.integers(0, len(self.pool), 600)]
        clutter = self.centroids[self._words(rng, 400)] + self.db_noise * self.pool[rng.integers(0, len(self.pool), 400)]
        return np.concatenate([planted, clutter]).astype(np.float32)


# -- reference (asmk 0.1.1) ---------------------------------------------------------------------------

def reference_available() -> bool:
    try:
        return importlib.util.find_spec("asmk.inverted_file") is not None
    except ImportError:
        return False


_BIT_REVERSED = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], np.uint8)


def to_reference_codes(codes: np.ndarray) -> np.ndarray:
    """how-met codes (bit j = bit j%64 of uint64 j//64) -> asmk's 4 x uint32 (element 0 = MSB)."""
    as_bytes = _BIT_REVERSED[np.ascontiguousarray(codes).view(np.uint8)]
    return np.ascontiguousarray(as_bytes).view(">u4").astype(np.uint32)


def reference_index(ivf: InvertedFile):
    """asmk's IVF holding exactly the postings of ``ivf`` (image ids = how-met positions)."""
    from asmk import inverted_file
    arrays = ivf.arrays()
    offsets = arrays["offsets"]
    counts = np.diff(offsets)
    vecs = np.split(to_reference_codes(arrays["vectors"]), offsets[1:-1])
    ids = np.split(arrays["image_ids"].astype(np.int64), offsets[1:-1])
    vecs = [v if len(v) else None for v in vecs]
    ids = [i if len(i) else None for i in ids]
    norm = arrays["n_vectors"].astype(np.float64)
    return inverted_file.IVF(norm, ivf.n_slots, vecs, ids, counts.astype(np.int32),
                             np.ones(ivf.n_words, np.float32), 0, use_idf=False)


def reference_bytes(ref) -> int:
    total = ref.norm_factor.nbytes + ref.counts.nbytes + ref.idf.nbytes
    for v, i in zip(ref.ivf_vecs, ref.ivf_image_ids):
        if v is not None:
            total += v.nbytes + i.nbytes
    return int(total)


# -- helpers --------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


# -- the benchmark ------------------------------------------------------------------------------------

def run(args) -> None:
    threads = configure_threads(args.threads)
    sizes = sorted(args.sizes)
    data = SyntheticMuseum(args.words, seed=args.seed, descriptors=args.descriptors)
    codebook = Codebook.from_centroids(data.centroids, method=args.method)
    t0 = time.perf_counter()
    codebook.assign(data.centroids[:1], 1)  # builds the approximate search structure
    codebook_setup = time.perf_counter() - t0
    use_ref = reference_available() and not args.no_reference
    print(f"# ASMK benchmark: codebook {args.words:,} words ({codebook.method} assignment, set up in "
          f"{codebook_setup:.1f} s), {args.descriptors} descriptors/image, {args.queries} queries, "
          f"{threads} thread(s), load average {os.getloadavg()[0]:.1f}, reference "
          f"{'asmk 0.1.1' if use_ref else 'not run'}\n")

    # database quantisation: measured on a few images, and agreement of the generating word
    desc, words, _ = data.database_batch(0, args.quantise_images)
    t0 = time.perf_counter()
    assigned = codebook.assign(desc, 1)[:, 0]
    db_quantise_us = 1e6 * (time.perf_counter() - t0) / len(desc)
    oracle_agreement = float(np.mean(assigned == words))
    del desc, words, assigned

    targets = np.sort(np.random.default_rng(args.seed).choice(min(1000, sizes[0]), args.queries, replace=False))
    target_desc = {}
    ivf = InvertedFile(args.words, DIM, codebook_fingerprint=codebook.fingerprint)
    build_seconds = 0.0
    rows, built = [], 0
    ref_rows = []
    queries = None
    extrap = {"ours": [], "ref": []}
    for size in sizes:
        # -- grow the index to `size` images (aggregation + insertion timed)
        while built < size:
            stop = min(size, built + args.batch)
            desc, words, image = data.database_batch(built, stop)
            for t in targets[(targets >= built) & (targets < stop)]:
                target_desc[int(t)] = desc[(t - built) * args.descriptors:(t - built + 1) * args.descriptors].copy()
            t0 = time.perf_counter()
            agg = aggregate(desc, words, data.centroids, image)
            ivf.add([f"db/{i:06d}" for i in range(built, stop)], agg)
            build_seconds += time.perf_counter() - t0
            built = stop
            del desc, words, image, agg
        t0 = time.perf_counter()
        ivf.consolidate()
        build_seconds += time.perf_counter() - t0
        if queries is None:
            queries = [data.query(j, target_desc[int(t)]) for j, t in enumerate(targets)]
            q_keys = [f"q/{j}" for j in range(len(queries))]
        gc.collect()

        # -- the reference, on the same postings
        if use_ref:
            from asmk import codebook as ref_codebook, index as ref_index, kernel as ref_kernel
            if size == sizes[0]:
                ref_cb = ref_codebook.Codebook(ref_index.initialize_index(None), size=args.words)
                ref_cb.index(data.centroids)
                kern = ref_kernel.ASMKKernel(ref_cb, binary=True)
                ref_build = measure_reference_build(data, ref_cb, kern, args)
                check_conversion(ivf)
            ref = reference_index(ivf)
            sim = lambda *a: kern.similarity(*a, alpha=3.0, similarity_threshold=0.0)  # noqa: E731
        n_ref = min(args.ref_queries or len(queries), len(queries)) if use_ref else 0

        # -- queries: how-met 32 per call (as `how-met query`), then the reference on the same
        # 32, alternately, so that both see the same machine load
        query_descriptors(ivf, codebook, queries[:2], q_keys[:2], k=args.k)  # warm-up
        timings, parts, total = {}, [], 0.0
        tq = ta = ts = 0.0
        ref_top1, ref_top10 = [], []
        for s in range(0, len(queries), 32):
            t0 = time.perf_counter()
            parts.append(query_descriptors(ivf, codebook, queries[s:s + 32], q_keys[s:s + 32], k=args.k,
                                           multiple_assignment=5, timings=timings))
            total += time.perf_counter() - t0
            for q in queries[s:min(s + 32, n_ref)]:
                t0 = time.perf_counter()
                quantised = ref_cb.quantize(q, multiple_assignment=5)
                t1 = time.perf_counter()
                agg = kern.aggregate_image(*quantised)
                t2 = time.perf_counter()
                ranks, _ = ref.search(*agg, similarity_func=sim, topk=args.k)
                t3 = time.perf_counter()
                tq, ta, ts = tq + t1 - t0, ta + t2 - t1, ts + t3 - t2
                ref_top1.append(ranks[0])
                ref_top10.append(ranks[:10])
        ours_top1 = np.concatenate([p.indices[:, 0] for p in parts])
        ours_top10 = np.concatenate([p.indices[:, :10] for p in parts])
        per_q = {k: 1e3 * v / len(queries) for k, v in timings.items()}
        per_q["total"] = 1e3 * total / len(queries)
        nbytes = ivf.nbytes()
        build_per_image = build_seconds / size + db_quantise_us * 1e-6 * args.descriptors
        row = {"system": "how-met", "size": size, **per_q, "correct": float(np.mean(ours_top1 == targets)),
               "build_s_per_image": build_per_image, "bytes_vector": nbytes["per_vector"],
               "bytes_vector_total": nbytes["per_vector_total"], "bytes_image": nbytes["per_image_total"],
               "ram_mb": nbytes["total"] / 2 ** 20, "rss_mb": rss_mb()}
        extrap["ours"].append((size, per_q["search"], per_q["quantise"] + per_q["aggregate"]))
        if use_ref:
            ref_top1 = np.array(ref_top1)
            rbytes = reference_bytes(ref)
            ref_row = {"system": "asmk 0.1.1", "size": size, "quantise": 1e3 * tq / n_ref,
                       "aggregate": 1e3 * ta / n_ref, "search": 1e3 * ts / n_ref,
                       "total": 1e3 * (tq + ta + ts) / n_ref,
                       "correct": float(np.mean(ref_top1 == targets[:n_ref])),
                       "build_s_per_image": ref_build, "bytes_vector": rbytes / max(ivf.n_postings, 1),
                       "bytes_vector_total": rbytes / max(ivf.n_postings, 1), "bytes_image": rbytes / size,
                       "ram_mb": rbytes / 2 ** 20, "rss_mb": rss_mb()}
            row["agreement"] = float(np.mean(ours_top1[:n_ref] == ref_top1))
            row["top10_overlap"] = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in
                                                  zip(ours_top10[:n_ref], ref_top10)]))
            row["speedup"] = ref_row["total"] / row["total"]
            extrap["ref"].append((size, ref_row["search"], ref_row["quantise"] + ref_row["aggregate"]))
            ref_rows.append(ref_row)
            rows.append(ref_row)
            del ref
            gc.collect()
        rows.append(row)
        print(f"  done {size:,} images ({time.perf_counter() - START:.0f} s)", file=sys.stderr, flush=True)

    # -- table
    print("| system | DB images | quantise ms | aggregate ms | search ms | total ms/query | speed-up | "
          "top-1 agree | top-10 overlap | top-1 correct | build s/image | B/agg. vector (postings / all) | "
          "B/image | index MB | RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = f"{r['speedup']:.0f}x" if "speedup" in r else ""
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else ""
        overlap = f"{100 * r['top10_overlap']:.1f}%" if "top10_overlap" in r else ""
        print(f"| {r['system']} | {r['size']:,} | {fmt(r['quantise'])} | {fmt(r['aggregate'])} | "
              f"{fmt(r['search'], 2)} | {fmt(r['total'])} | {speed} | {agree} | {overlap} | "
              f"{100 * r['correct']:.1f}% | {r['build_s_per_image']:.4f} | "
              f"{r['bytes_vector']:.1f} / {r['bytes_vector_total']:.1f} | {fmt(r['bytes_image'], 0)} | "
              f"{fmt(r['ram_mb'])} | {fmt(r['rss_mb'], 0)} |")
    print(f"| rerank 100 candidates | | | | | {rerank_line(args)} | | | | | | | | | |")

    # -- extrapolation to the Met database
    print(f"\nExtrapolated to the Met database ({MET_IMAGES:,} images; search time, index size and build "
          f"time scaled in proportion to the database from {sizes[-1]:,} images):")
    last = [r for r in rows if r["system"] == "how-met"][-1]
    for name, points, row in (("how-met", extrap["ours"], last),
                              ("asmk 0.1.1", extrap["ref"], ref_rows[-1] if ref_rows else None)):
        if not points or row is None:
            continue
        # postings scanned per query grow in proportion to the database
        search_ms = points[-1][1] * MET_IMAGES / points[-1][0]
        fixed = points[-1][2]
        print(f"- {name}: {fixed + search_ms:,.0f} ms/query ({search_ms:,.1f} ms search), index "
              f"{row['bytes_image'] * MET_IMAGES / 2 ** 30:,.2f} GiB, build "
              f"{row['build_s_per_image'] * MET_IMAGES / 3600:,.1f} h on {threads} thread(s)")
    print(f"\nDatabase quantisation: {db_quantise_us:.1f} us/descriptor ({codebook.method}, k=1, measured on "
          f"{args.quantise_images} images); generating word = codebook's nearest word for "
          f"{100 * oracle_agreement:.2f}% of database descriptors.")
    if args.recall:
        sample = np.concatenate(queries)[:: max(1, len(queries) * args.descriptors // 2000)][:2000]
        for method in ("bfloat16", "grouped", "ivf", "hnsw"):
            cb = Codebook.from_centroids(data.centroids, method=method)
            t0 = time.perf_counter()
            cb.assign(sample[:1], 1)
            setup = time.perf_counter() - t0
            rec = quantisation_recall(cb, sample, k=5)
            print(f"Assignment recall ({method}, synthetic: see eval/bench_assignment.py for real "
                  f"descriptors; top-5 of {rec['descriptors']} query descriptors): "
                  f"recall@5 {100 * rec['recall']:.2f}%, top-1 {100 * rec['top1']:.2f}%, "
                  f"{rec['search_ms_per_1000']:.1f} ms vs exact {rec['exact_ms_per_1000']:.1f} ms per 1000 "
                  f"descriptors (set-up {setup:.1f} s)")
    print(f"Peak RSS of the whole run: {peak_rss_mb():,.0f} MB; wall time {time.perf_counter() - START:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}.")


def measure_reference_build(data, ref_cb, kern, args) -> float:
    """Seconds per image of asmk's own build (quantise + aggregate + insert), on a few images."""
    from asmk import inverted_file
    desc, _, image = data.database_batch(0, args.ref_build_images)
    ref = inverted_file.IVF.initialize_empty(codebook_size=args.words, use_idf=False)
    t0 = time.perf_counter()
    quantised = ref_cb.quantize(desc, image.copy(), multiple_assignment=1)
    ref.add(*kern.aggregate(*quantised))
    return (time.perf_counter() - t0) / args.ref_build_images


def check_conversion(ivf: InvertedFile) -> None:
    """The converted codes must be what asmk itself packs from the same signs."""
    from asmk import hamming
    codes = ivf.arrays()["vectors"][:1000]
    bits = unpack_signs(codes, DIM).astype(np.float32) * 2 - 1
    if not np.array_equal(hamming.binarize_and_pack_2D(bits), to_reference_codes(codes)):
        raise RuntimeError("code conversion to the asmk layout is wrong")


def rerank_line(args) -> str:
    """The reranker's cost per query (eval/bench_rerank.py), when that benchmark is available."""
    if args.no_rerank:
        return "not run (--no-rerank)"
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_rerank import bench_rerank
    except ImportError:
        return "n/a (reranker benchmark not available)"
    out = bench_rerank(n_candidates=100, n_words=args.words, n_queries=3)
    return f"{out['rerank_verified_ms']:,.0f} ms ({out['rerank_asmk_only_ms']:.1f} ms ASMK only)"


START = time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="codebook 8,192 and databases of 1k/2k/5k images")
    p.add_argument("--words", type=int, help="codebook size (default 65,536; 8,192 with --small)")
    p.add_argument("--sizes", type=int, nargs="+", help="database sizes (default 2000 10000 40000)")
    p.add_argument("--queries", type=int, help="query images (default 100; 40 with --small)")
    p.add_argument("--ref-queries", type=int, help="queries run through the reference (default all)")
    p.add_argument("--descriptors", type=int, default=1000, help="descriptors per image")
    p.add_argument("--k", type=int, default=100, help="neighbours per query")
    p.add_argument("--batch", type=int, default=500, help="database images generated and added at once")
    p.add_argument("--quantise-images", type=int, default=100, help="database images quantised for timing")
    p.add_argument("--ref-build-images", type=int, default=10, help="images the reference build is timed on")
    p.add_argument("--method", default="auto", choices=SEARCH_METHODS, help="assignment search")
    p.add_argument("--threads", type=int, help="threads (default: how_met.utils.free_cores())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip asmk 0.1.1 even if installed")
    p.add_argument("--no-rerank", action="store_true", help="skip the rerank line")
    p.add_argument("--no-recall", dest="recall", action="store_false", help="skip the bfloat16/grouped/ivf/hnsw recall lines")
    args = p.parse_args(argv)
    args.words = args.words or (8192 if args.small else 65536)
    args.sizes = args.sizes or ([1000, 2000, 5000] if args.small else [2000, 10000, 40000])
    args.queries = args.queries or (40 if args.small else 100)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
