"""Quantization with auto-round and the exported deployment files."""
