"""Ranked neighbours -> recognised classes: global-descriptor search, the kNN classifier, GAP
metrics, fusion of neighbour lists and the one tuning protocol."""
