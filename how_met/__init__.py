"""how-met: HOW local descriptors + ASMK + kNN classification for instance-level recognition.

Stages (one module each): extract -> codebook -> ivf (index) -> query -> knn/metrics ->
evaluate -> report. Import what you need from the stage modules, e.g.
``from how_met.extract import extract_to_store``.
"""
__version__ = "0.1.0"
