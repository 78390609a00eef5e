"""Block-selection policies of the engine, one file each, behind
:class:`~.base.BlockPolicy` and chosen by name from :mod:`.registry`.

Importing this package (or the registry) imports neither vLLM nor torch, so
the configuration can list the policy names.
"""
