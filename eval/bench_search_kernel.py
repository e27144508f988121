"""The ASMK search kernel at the Met's posting volume: CPU time per query and per posting.

    python eval/bench_search_kernel.py                    # 397,121 images: ~275M postings, ~6 GB of RAM
    python eval/bench_search_kernel.py --images 40000     # bench_asmk's largest size
    python eval/bench_search_kernel.py --pipeline 64 --threads 1 2   # + the whole query path

A synthetic inverted file with the word statistics of eval/bench_asmk.py's generator (the Met
statistics of eval/bench_scale.py: 65,536 words of Zipf-like popularity, ~692 distinct words per
image; each word's document frequency is its expected value, its images drawn at random), random
128-bit codes, and the word sets of ``--queries`` generator queries (multiple assignment 5).
Only the kernel is timed (``how_met.asmk.kernels.search_binary``, one thread, top 100), in CPU
time (process time: the figure to compare on a loaded machine), against the kernel it replaced
(the stamp-per-image kernel, kept in tests/asmk/test_search_kernel.py as the reference); the two
rankings are checked to be identical.

``--pipeline N`` then times the library's whole ASMK query path (``how_met.asmk.query.
query_descriptors``: the codebook's default assignment at 65,536 words, bfloat16 on CPUs with
AMX, else grouped, with multiple assignment 5; aggregation; the search, top 100) on N generator
queries of 1,000 descriptors, in batches of 32, against the same index, for each of
``--threads`` (wall and CPU time; the number of queries scales the time linearly, so the 21,484
Met queries are extrapolated from it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_asmk import SyntheticMuseum  # noqa: E402
from how_met.asmk import codes, kernels  # noqa: E402
from how_met.asmk.codebook import Codebook  # noqa: E402
from how_met.asmk.inverted_file import InvertedFile  # noqa: E402
from how_met.asmk.query import query_descriptors  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402

QUERY_BATCH = 32  # queries per query_descriptors call in --pipeline


def synthetic_index(n_images: int, data: SyntheticMuseum, rng):
    """(offsets, codes, image ids) with each word's expected document frequency."""
    n_words = len(data.centroids)
    popularity = np.empty(n_words)
    popularity[data.word_of_rank] = np.diff(np.concatenate([[0.0], data.cdf]))
    df = np.round(n_images * (1 - (1 - popularity) ** data.words_per_image)).astype(np.int64)
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(df, out=offsets[1:])
    image_ids = np.empty(offsets[-1], np.uint32)
    for w in np.flatnonzero(df):
        drawn = np.unique(rng.integers(0, n_images, int(df[w] * 1.2) + 8))
        if len(drawn) < df[w]:
            drawn = np.unique(np.concatenate([drawn, rng.choice(n_images, df[w], replace=False)]))
        image_ids[offsets[w]:offsets[w + 1]] = np.sort(rng.choice(drawn, df[w], replace=False))
    vectors = np.empty((offsets[-1], 2), np.uint64)
    step = 1 << 24
    for a in range(0, len(vectors), step):
        b = min(len(vectors), a + step)
        vectors[a:b] = rng.integers(0, 2 ** 63, (b - a, 2), dtype=np.int64).astype(np.uint64)
    return offsets, vectors, image_ids, df


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=397_121)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each kernel (alternating)")
    p.add_argument("--pipeline", type=int, default=0, metavar="N",
                   help="also time the whole query path on N queries (0: not)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts of --pipeline")
    p.add_argument("--met-queries", type=int, default=21_484, help="queries to extrapolate --pipeline to")
    args = p.parse_args(argv)
    configure_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "asmk"))
    from test_search_kernel import reference_search_binary

    rng = np.random.default_rng(0)
    data = SyntheticMuseum(65536)
    codebook = Codebook.from_centroids(data.centroids)
    desc, _, image = data.database_batch(0, args.queries)
    query_words = [np.unique(codebook.assign(data.query(j, desc[image == j]), 5)) for j in range(args.queries)]
    started = time.perf_counter()
    offsets, vectors, image_ids, df = synthetic_index(args.images, data, rng)
    q_words = np.concatenate(query_words).astype(np.int64)
    q_off = np.concatenate([[0], np.cumsum([len(w) for w in query_words])]).astype(np.int64)
    q_codes = rng.integers(0, 2 ** 63, (len(q_words), 2), dtype=np.int64).astype(np.uint64)
    q_scale = 1 / np.sqrt(np.array([len(w) for w in query_words], np.float64))
    n_vectors = np.bincount(image_ids, minlength=args.images)
    db_scale = 1 / np.sqrt(n_vectors.clip(1))
    table = codes.kernel_table(128, 3.0, 0.0)
    per_query = df[q_words].sum() / args.queries
    print(f"# {args.images:,} images, {offsets[-1]:,} postings ({offsets[-1] / args.images:.0f} per image), "
          f"{per_query:,.0f} postings per query ({len(q_words) / args.queries:,.0f} words); built in "
          f"{time.perf_counter() - started:.0f} s")
    common = (q_off, q_words, q_codes, q_scale, offsets, vectors, image_ids, db_scale, np.ones(65536), table, 100)
    kernels_timed = (("stamp kernel (before)", lambda: reference_search_binary(*common)),
                     ("search_binary (vectorised, float32 sums)", lambda: kernels.search_binary(*common, 1)))
    results = {}
    for name, run in kernels_timed:
        results[name] = run()  # compiles
    print("| kernel | ms CPU / query | ns CPU / posting |\n|---|---:|---:|")
    for _ in range(args.repeats):
        for name, run in kernels_timed:
            cpu = time.process_time()
            run()
            cpu = time.process_time() - cpu
            print(f"| {name} | {1e3 * cpu / args.queries:.1f} | {1e9 * cpu / args.queries / per_query:.2f} |", flush=True)
    (a_i, a_s), (b_i, b_s) = results.values()
    print(f"identical rankings and scores: {bool(np.array_equal(a_i, b_i) and np.array_equal(a_s, b_s))}")
    if args.pipeline:
        index = InvertedFile.from_postings([str(i) for i in range(args.images)], offsets, vectors, image_ids, n_vectors)
        time_query_path(index, codebook, data, args)
    return 0


def time_query_path(index, codebook, data: SyntheticMuseum, args) -> None:
    """Wall and CPU time per query of query_descriptors, in batches, at each thread count."""
    desc, _, image = data.database_batch(0, min(args.pipeline, 64))
    queries = [data.query(j, desc[image == j % 64]) for j in range(args.pipeline)]
    query_descriptors(index, codebook, queries[:QUERY_BATCH])  # compiles, derives the groups
    print(f"\n# whole query path ({codebook.method} assignment, multiple assignment 5, top 100), "
          f"{args.pipeline} queries in batches of {QUERY_BATCH}, ms per query; {args.met_queries:,} queries extrapolated")
    print("| threads | quantise | aggregate | search | wall | CPU | "
          f"{args.met_queries:,} queries (wall) |\n|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        configure_threads(threads)
        timings: dict = {}
        wall, cpu = time.perf_counter(), time.process_time()
        for a in range(0, len(queries), QUERY_BATCH):
            query_descriptors(index, codebook, queries[a:a + QUERY_BATCH], timings=timings)
        wall, cpu = (time.perf_counter() - wall) / len(queries), (time.process_time() - cpu) / len(queries)
        stages = " | ".join(f"{1e3 * timings.get(s, 0.0) / len(queries):.1f}" for s in ("quantise", "aggregate", "search"))
        print(f"| {threads} | {stages} | {1e3 * wall:.1f} | {1e3 * cpu:.1f} | "
              f"{wall * args.met_queries / 60:.1f} min |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
