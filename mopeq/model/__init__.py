"""Loading models, discovering their MoE layout, the native architectures."""
