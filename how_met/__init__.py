"""how-met: HOW local descriptors + ASMK + kNN classification for instance-level recognition.

The package follows the data flow: ``features`` (images -> HDF5 feature store) -> ``asmk``
(codebook -> inverted file -> ranked neighbours) -> ``verify`` (spatial reranking) ->
``recognition`` (kNN classifier, GAP, tuning) -> ``pipeline`` (evaluate, report, demo);
``training`` trains the HOW network of ``features`` (the model file it writes feeds the rest).
The main objects are importable from here, e.g. ``from how_met import Codebook``; each is
loaded on first use, so importing ``how_met`` costs nothing.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Dataset": "datasets", "load_dataset": "datasets",
    "FeatureStore": "features.store", "LocalFeatures": "features.store", "merge_stores": "features.store",
    "HOWNet": "features.network", "ModelConfig": "features.network",
    "build_model": "features.checkpoints", "load_model": "features.checkpoints",
    "save_model": "features.checkpoints",
    "PCAWhitening": "features.whitening",
    "extract_to_store": "features.extract", "learn_whitening": "features.extract",
    "model_of_store": "features.extract", "model_fingerprint": "features.network",
    "Codebook": "asmk.codebook", "train_codebook": "asmk.codebook",
    "quantise_and_aggregate": "asmk.aggregation",
    "InvertedFile": "asmk.inverted_file", "build_index": "asmk.indexing",
    "ShardedIndex": "asmk.sharded", "split_index": "asmk.sharded",
    "RayExtraction": "features.distributed",
    "query_descriptors": "asmk.query", "query_store": "asmk.query",
    "Neighbours": "neighbours",
    "Reranker": "verify.reranker", "SpatialParams": "verify.reranker",
    "FusionWeights": "verify.scores", "score_shortlist": "verify.scores",
    "rerank_neighbours": "verify.scores",
    "global_neighbours": "recognition.global_search",
    "knn_predict": "recognition.knn", "evaluate_predictions": "recognition.metrics",
    "Recogniser": "recognition.recogniser", "build_recogniser": "recognition.recogniser",
    "train_model": "training.trainer", "training_images": "training.data",
    "TrainingSettings": "training.settings",
    "run_evaluation": "pipeline.evaluate", "query_images": "pipeline.query",
    "write_report": "pipeline.report", "run_demo": "pipeline.demo",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'how_met' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
