"""Sharded search on Ray actors == one inverted file, on the museum set (issue 15)."""
import json

import numpy as np
import pytest

from how_met.asmk.aggregation import quantise_and_aggregate
from how_met.asmk.codebook import load_codebook
from how_met.asmk.inverted_file import InvertedFile
from how_met.asmk.query import query_store
from how_met.features.store import FeatureStore

pytest.importorskip("ray")
from how_met.asmk.sharded import ShardedIndex, split_index  # noqa: E402


@pytest.fixture(scope="module")
def museum(museum_evaluation, museum_dir):
    """(work directory, codebook, query keys, database keys) of the shared museum evaluation."""
    work, _ = museum_evaluation
    queries = [q["path"] for q in json.loads((museum_dir / "queries.json").read_text())]
    db = [e["path"] for e in json.loads((museum_dir / "database.json").read_text())]
    return work, load_codebook(work / "codebook.npz"), queries, db


def _aggregated(codebook, features, keys, assignment):
    with FeatureStore(features) as store:
        descs = [store.descriptors(key) for key in keys]
    return quantise_and_aggregate(codebook, descs, assignment, True)[1]


def _assert_same(sharded, single):
    assert sharded.query_keys == single.query_keys and sharded.db_keys == single.db_keys
    np.testing.assert_array_equal(sharded.indices, single.indices)
    np.testing.assert_array_equal(sharded.scores, single.scores)


def test_sharded_search_is_single_index_search(ray_local, museum, tmp_path):
    work, codebook, queries, _ = museum
    single = InvertedFile.load(work / "index")
    split_index(single, 3, tmp_path / "sharded")
    with ShardedIndex(tmp_path / "sharded") as sharded:
        assert sharded.n_shards == 3 and len(sharded) == len(single) and sharded.keys == single.keys
        # the query path of every command, over a sharded index: same rows
        _assert_same(query_store(sharded, codebook, work / "features.h5", k=50, keys=queries, show_progress=False),
                     query_store(single, codebook, work / "features.h5", k=50, keys=queries, show_progress=False))
        batch = _aggregated(codebook, work / "features.h5", queries, 3)
        for use_idf in (False, True):  # idf of the whole collection in every shard
            _assert_same(sharded.search(batch, k=20, query_keys=queries, use_idf=use_idf),
                         single.search(batch, k=20, query_keys=queries, use_idf=use_idf))


def test_added_images_and_ties_rank_as_in_one_index(ray_local, museum, tmp_path):
    """Shards of all but the last 10 database images, then those 10 added, then a copy of the
    first query's top image (an exact tie across shards): one index ranks the original first,
    and so must the shards -- also after saving and reopening them."""
    work, codebook, queries, db = museum
    single = InvertedFile.load(work / "index")
    later = single.slot_keys[-10:]
    split_index(single.subset(~np.isin(single.slot_keys, later)), 4, tmp_path / "sharded")
    batch = _aggregated(codebook, work / "features.h5", queries, 3)
    first = single.search(batch, k=1, query_keys=queries).top(queries[0])[0][0]
    copy = "copies/" + first
    single.add([copy], _aggregated(codebook, work / "features.h5", [first], 1))
    expected = single.search(batch, k=10, query_keys=queries)
    with ShardedIndex(tmp_path / "sharded") as sharded:
        sharded.add(later, _aggregated(codebook, work / "features.h5", later, 1))
        sharded.add([copy], _aggregated(codebook, work / "features.h5", [first], 1))
        with pytest.raises(ValueError, match="already in the index"):
            sharded.add([first], _aggregated(codebook, work / "features.h5", [first], 1))
        _assert_same(sharded.search(batch, k=10, query_keys=queries), expected)
        sharded.save()
    both = {single.slot_keys.index(first), single.slot_keys.index(copy)}
    rows = [row for row, ids in enumerate(expected.indices) if both <= set(ids)]
    assert rows and rows[0] == 0
    ranked = expected.top(queries[rows[0]])
    at = [key for key, _ in ranked].index(first)
    assert ranked[at + 1] == (copy, ranked[at][1])  # the tie: same score, the original first
    with ShardedIndex(tmp_path / "sharded") as reopened:
        assert copy in reopened and len(reopened) == len(single)
        _assert_same(reopened.search(batch, k=10, query_keys=queries), expected)
        assert reopened.remove([copy]) == 1
        single.remove([copy])
        _assert_same(reopened.search(batch, k=10, query_keys=queries, use_idf=True),
                     single.search(batch, k=10, query_keys=queries, use_idf=True))
