"""vLLM glue of the INFINIGEN backend (imports vLLM; loaded by vLLM itself)."""
