"""DeepSeek-VL2 (tiny / small / base) built from transformers parts, loaded without remote code.

The hub repositories (``deepseek-ai/deepseek-vl2-tiny``, ``-small``, ``deepseek-vl2``) ship a
``config.json`` with ``model_type: deepseek_vl_v2``, safetensors under the authors' key names
and tokenizer files, but no modeling code. This package rebuilds the model from transformers'
``SiglipVisionModel`` (vision tower), ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``
(language model) and a small projector, maps the checkpoint's keys onto them, and provides the
authors' dynamic-tiling image processing, prompt format and an MME adapter.

- ``config``: the hub config -> transformers configs (with the authors' defaults);
- ``language``: the language model for each structure (MHA tiny, MLA small, sigmoid-routed base);
- ``vision``: SigLIP tower, projector, and the timm -> transformers weight names;
- ``model``: the composite model (image features spliced into the token embeddings) and
  greedy decoding;
- ``processing``: tiling, prompt format, the processor;
- ``loading``: reading / writing folders in the hub layout and mopeq's quantized export.
"""

from mopeq.model.archs.deepseek_vl2.loading import load, save_hub_layout  # noqa: F401

MODEL_TYPE = "deepseek_vl_v2"
