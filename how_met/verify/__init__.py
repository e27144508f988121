"""Spatial verification of a shortlist: geometry (solvers, RANSAC), tentative correspondences,
the reranker and the fused scores of a reranked shortlist."""
