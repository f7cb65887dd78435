"""Native implementations of MoE VLMs whose published code does not run on transformers 5.

Each module builds the model from transformers-native parts, loads the hub checkpoint by key
mapping (no remote code) and provides the processor and evaluation adapter. ``load_model``
picks them through ``mopeq.model.loading.NATIVE_ARCHS``.
"""
