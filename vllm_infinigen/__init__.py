"""vllm-infinigen: InfiniGen KV-cache speculation as a vLLM plugin.

Importing this package is cheap: it imports neither vLLM nor torch. vLLM
calls :func:`vllm_infinigen.plugin.register` through the
``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
