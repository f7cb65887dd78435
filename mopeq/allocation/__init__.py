"""Bits per expert: k-means, budget (knapsack), baselines, quantization errors."""
