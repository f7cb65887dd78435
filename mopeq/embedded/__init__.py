"""The embedded tiny MoE VLM and its procedural MME-style benchmark."""
