"""Every behaviour change this plugin makes to vLLM, one module per touch point.

Each module names the vLLM function it wraps, checks the installed vLLM
version before touching anything (:func:`require_vllm`) and applies itself
idempotently. Importing this package imports no vLLM code.
"""
