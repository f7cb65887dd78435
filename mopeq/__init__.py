"""mopeq: per-expert mixed-precision quantization of Mixture-of-Experts models (MoPEQ and beyond).

The library is a chain of plain functions on plain data: load a model (``models``), discover
its experts (``moe``), score their sensitivity (``sensitivity``), allocate bits
(``allocate``), estimate memory (``memory``), quantize (``quantize``), evaluate (``evaluate``).
Nothing heavy happens at import time.
"""

__version__ = "0.1.0"
