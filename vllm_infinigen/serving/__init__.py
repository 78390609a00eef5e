"""INFINIGEN on ``vllm serve``'s HTTP side: metrics and the options API."""
