"""Torch-free foundations: the method table, memory accounting, the cache."""
