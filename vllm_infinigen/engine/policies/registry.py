"""Which class implements each ``policy`` option value.

The factory imports a policy's module only when the policy is made, so this
module (read by :mod:`vllm_infinigen.config` to validate the option) stays
free of torch and vLLM. Adding a policy: one new module with a
:class:`~.base.BlockPolicy` subclass, and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import BlockPolicy, PolicyContext

#: Policy name -> ``module:Class`` (relative to this package).
_CLASSES: dict[str, str] = {
    "infinigen": "infinigen:InfiniGenPolicy",
    "quest": "quest:QuestPolicy",
    "h2o": "h2o:H2OPolicy",
    "streaming": "streaming:StreamingPolicy",
    "dense": "dense:DensePolicy",
}

#: The values the ``policy`` option accepts, in the order docs list them.
POLICIES: tuple[str, ...] = tuple(_CLASSES)


def policy_class(name: str) -> type[BlockPolicy]:
    """The class of policy ``name`` (ValueError naming the option otherwise)."""
    if name not in _CLASSES:
        raise ValueError(
            f"infinigen option 'policy' must be one of {list(POLICIES)}, got {name!r}"
        )
    module, cls = _CLASSES[name].split(":")
    found: type[BlockPolicy] = getattr(
        importlib.import_module(f"{__package__}.{module}"), cls
    )
    return found


def make_policy(name: str, context: PolicyContext) -> BlockPolicy:
    """A new policy object for one worker."""
    return policy_class(name)(context)
