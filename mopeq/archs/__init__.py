"""Native implementations of models whose hub repositories ship no code for transformers 5."""
