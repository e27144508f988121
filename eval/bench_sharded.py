"""Sharded search on Ray actors against one inverted file: the cost of the fan-out and merge.

    python eval/bench_sharded.py                 # 40,000 images, 4 shards, 65,536 words
    python eval/bench_sharded.py --images 5000 --words 8192 --queries 40

The database is bench_asmk's synthetic museum (1,000 descriptors per image on ~700 words,
indexed under their generating words); queries are its planted-match queries, quantised with
multiple assignment 5. The one index is saved and loaded memory-mapped, as each shard's actor
loads its shard. Timed: ``search`` of the same aggregated queries (top k), in batches of 32 (as
``how-met query``) and one query at a time (latency), on a local Ray instance of 2 CPUs; every
sharded answer is checked to equal the one index's (keys, scores, order).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_asmk import DIM, SyntheticMuseum  # noqa: E402
from how_met.asmk.aggregation import aggregate, quantise_and_aggregate  # noqa: E402
from how_met.asmk.codebook import Codebook  # noqa: E402
from how_met.asmk.inverted_file import InvertedFile  # noqa: E402
from how_met.asmk.sharded import ShardedIndex, split_index  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402


def timed_search(index, batches, k: int, repeats: int):
    """(best seconds over ``repeats`` for all batches, the answers of the last pass)."""
    best, answers = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        answers = [index.search(agg, k=k, query_keys=keys) for agg, keys in batches]
        best = min(best, time.perf_counter() - t0)
    return best, answers


def same(a, b) -> bool:
    return a.db_keys == b.db_keys and np.array_equal(a.indices, b.indices) and np.array_equal(a.scores, b.scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--words", type=int, default=65536)
    p.add_argument("--descriptors", type=int, default=1000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="timed passes (the best is kept)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--work", type=Path, help="folder for the index files (default: a temporary one)")
    args = p.parse_args(argv)
    import ray

    configure_threads(1)
    data = SyntheticMuseum(args.words, descriptors=args.descriptors)
    codebook = Codebook.from_centroids(data.centroids)
    ivf = InvertedFile(args.words, DIM, codebook_fingerprint=codebook.fingerprint)
    targets = np.sort(np.random.default_rng(0).choice(min(1000, args.images), args.queries, replace=False))
    target_desc = {}
    t0 = time.perf_counter()
    for start in range(0, args.images, 500):
        stop = min(args.images, start + 500)
        desc, words, image = data.database_batch(start, stop)
        for t in targets[(targets >= start) & (targets < stop)]:
            target_desc[int(t)] = desc[(t - start) * args.descriptors:(t - start + 1) * args.descriptors].copy()
        ivf.add([f"db/{i:06d}" for i in range(start, stop)], aggregate(desc, words, data.centroids, image))
    build = time.perf_counter() - t0
    queries = [data.query(j, target_desc[int(t)]) for j, t in enumerate(targets)]
    keys = [f"q/{j}" for j in range(len(queries))]
    batches32 = [(quantise_and_aggregate(codebook, queries[s:s + 32], 5, True)[1], keys[s:s + 32])
                 for s in range(0, len(queries), 32)]
    batches1 = [(quantise_and_aggregate(codebook, [q], 5, True)[1], [key]) for q, key in zip(queries, keys)]

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        ivf.save(Path(tmp) / "index")
        postings = ivf.n_postings
        del ivf
        t0 = time.perf_counter()
        split_index(Path(tmp) / "index", args.shards, Path(tmp) / "sharded")
        split = time.perf_counter() - t0
        single = InvertedFile.load(Path(tmp) / "index")
        rows = []
        for threads in (1, 2):
            configure_threads(threads)
            timed_search(single, batches32[:1], args.k, 1)  # first touch of the mapped postings
            rows.append((f"one index, {threads} thread(s)",) + tuple(
                timed_search(single, b, args.k, args.repeats) for b in (batches32, batches1)))
        configure_threads(1)
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        with ShardedIndex(Path(tmp) / "sharded", threads_per_shard=1) as sharded:
            started = time.perf_counter() - t0
            t0 = time.perf_counter()
            sharded.search(batches32[0][0], k=args.k, query_keys=batches32[0][1])
            first = time.perf_counter() - t0
            rows.append((f"{args.shards} shards on Ray actors, 1 thread each",) + tuple(
                timed_search(sharded, b, args.k, args.repeats) for b in (batches32, batches1)))
        ray.shutdown()

    reference = rows[0]
    identical = all(same(a, b) for row in rows[1:] for i in (1, 2) for a, b in zip(row[i][1], reference[i][1]))
    print(f"# sharded search: {args.images:,} synthetic images ({postings:,} postings, {args.words:,} words), "
          f"{args.shards} shards, {len(queries)} queries (multiple assignment 5), top {args.k}, "
          f"local Ray with {args.cpus} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"# index built in {build:.0f} s, split in {split:.1f} s; Ray + actors started in {started:.1f} s, "
          f"first sharded search {first:.2f} s; answers identical to one index: {identical}\n")
    print("| search | ms/query, batches of 32 | ms/query, one at a time |")
    print("|---|---:|---:|")
    for name, (t32, _), (t1, _) in rows:
        print(f"| {name} | {1000 * t32 / len(queries):.2f} | {1000 * t1 / len(queries):.2f} |")
    base32, base1 = reference[1][0], reference[2][0]
    t32, t1 = rows[-1][1][0], rows[-1][2][0]
    print(f"\noverhead of the shards vs one index on 1 thread: {1000 * (t32 - base32) / len(queries):+.2f} ms/query "
          f"(batches of 32), {1000 * (t1 - base1) / len(queries):+.2f} ms/query (one at a time)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
