"""Local features -> ranked database images with ASMK: codebook, sign codes, aggregation,
numba kernels, the inverted file and its files, index building and the query stage."""
