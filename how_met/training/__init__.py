"""Training HOW local descriptors for a collection (``how-met train``): the ECCV'20 recipe on
tuples built from exhibit images (``trainer.train_model``). Sits beside the pipeline: it uses the
network of ``features`` and the kNN/GAP of ``recognition`` for validation, and what it produces
is a model file that every stage loads like any other (``--checkpoint``)."""
