"""Images -> HOW local features: image input, CNN trunks, the HOW network and its files,
PCA-whitening, extraction settings, the HDF5 feature store and the extraction stage."""
