"""Word assignment on real descriptors: recall and cost of each search against exact search.

    python eval/bench_assignment.py --codebook CB.npz --features F.h5 --data ../shared/data/museum
    python eval/bench_assignment.py ... --nprobe 4 16 64 --ef-search 64 256 --threads 1
    python eval/bench_assignment.py ... --nlist 1024 4096 --hnsw-m 16 32 64   # sweeps of the structure
    python eval/bench_assignment.py ... --probes 32 48 64 96 --nprobe --ef-search   # grouped only

Every run also measures the exact search and the bfloat16 one (how_met.asmk.bfloat16_search).

Query side: recall@5 = fraction of the exact 5 nearest words found by the search (query
multiple assignment 5), on ``--samples`` random query descriptors. Database side: top-1
agreement = fraction of database descriptors given the exact nearest word (database
assignment), on as many random database descriptors. Costs are ms per 1000 descriptors on
the given threads, i.e. per image at 1000 descriptors (query: k=5, database: k=1), wall clock
and CPU (process time: on a loaded machine the CPU figure is the one to compare); the set-up of
a search index is not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from how_met.asmk.codebook import Codebook, assignment_agreement  # noqa: E402
from how_met.datasets import load_dataset  # noqa: E402
from how_met.features.store import FeatureStore  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402


def _sample(store, keys, n, rng):
    desc = np.concatenate([store.descriptors(k) for k in keys]).astype(np.float32)
    return desc[np.sort(rng.choice(len(desc), min(n, len(desc)), replace=False))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codebook", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True, help="feature store of the dataset's images")
    p.add_argument("--data", type=Path, required=True, help="Met-format directory (database and query keys)")
    p.add_argument("--samples", type=int, default=20000, help="query and database descriptors each")
    p.add_argument("--nprobe", type=int, nargs="*", default=[4, 16, 64, 128])
    p.add_argument("--nlist", type=int, nargs="*", default=[None],
                   help="IVF lists (default: the codebook's own, K / 16); each with every --nprobe")
    p.add_argument("--ef-search", type=int, nargs="*", default=[32, 128, 256, 512])
    p.add_argument("--probes", type=int, nargs="*", default=[32, 64],
                   help="groups probed by the grouped search (K / 64 groups)")
    p.add_argument("--hnsw-m", type=int, nargs="*", default=[None],
                   help="HNSW graph degrees M (default: the codebook's own, 32); each with every --ef-search")
    p.add_argument("--threads", type=int, help="threads (default: how_met.utils.configure_threads())")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    threads = configure_threads(args.threads)
    ds = load_dataset(args.data)
    rng = np.random.default_rng(0)
    with FeatureStore(args.features) as store:
        queries = _sample(store, ds.query_keys, args.samples, rng)
        database = _sample(store, ds.db_keys, args.samples, rng)
    def search(method, **settings):  # settings left at None: the codebook's own
        return {"method": method, **{k: v for k, v in settings.items() if v is not None}}
    searches = [search("exact"), search("bfloat16")] + [search("grouped", probes=n) for n in args.probes] + \
        [search("ivf", nlist=nlist, nprobe=n) for nlist in args.nlist for n in args.nprobe] + \
        [search("hnsw", hnsw_m=m, ef_search=ef) for m in args.hnsw_m for ef in args.ef_search]
    words = len(Codebook.load(args.codebook).centroids)
    print(f"# {words:,} words, {len(queries):,} query / {len(database):,} database descriptors, "
          f"{threads} thread(s)")
    print("| search | query recall@5 | database top-1 | query ms/image (CPU) | database ms/image (CPU) |")
    print("|---|---:|---:|---:|---:|")
    rows, exact = [], {}  # the first search is the exact one: its ids are the reference
    built = {}  # one search structure per (method, nlist / M): the probe and ef sweeps reuse it
    for settings in searches:
        structure = (settings["method"], settings.get("nlist"), settings.get("hnsw_m"))
        if structure not in built:
            cb = built[structure] = Codebook.load(args.codebook, **settings)
            cb.assign(queries[:1], 1)  # build the search index outside the timing
        cb = built[structure]
        cb.nprobe, cb.ef_search = settings.get("nprobe", cb.nprobe), settings.get("ef_search", cb.ef_search)
        cb.probes = settings.get("probes", cb.probes)
        row = dict(settings)
        for side, desc, k in (("query", queries, 5), ("db", database, 1)):
            started, cpu = time.perf_counter(), time.process_time()
            ids = cb.assign(desc, k)
            row[f"{side}_ms_per_image"] = 1000 * (time.perf_counter() - started) * 1000 / len(desc)
            row[f"{side}_cpu_ms_per_image"] = 1000 * (time.process_time() - cpu) * 1000 / len(desc)
            exact.setdefault(side, ids)
            recall, top1 = assignment_agreement(ids, exact[side])
            if side == "query":
                row["recall5"] = recall
            else:
                row["top1"] = top1
        rows.append(row)
        label = ", ".join(f"{k} {v}" for k, v in settings.items())
        print(f"| {label} | {row['recall5']:.4f} | {row['top1']:.4f} | {row['query_ms_per_image']:.0f} "
              f"({row['query_cpu_ms_per_image']:.0f}) | {row['db_ms_per_image']:.0f} ({row['db_cpu_ms_per_image']:.0f}) |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"words": words, "threads": threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
