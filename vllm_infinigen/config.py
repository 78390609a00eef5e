"""The one validated configuration of the INFINIGEN backend.

Options arrive through vLLM's plugin channel::

    vllm serve MODEL --attention-backend infinigen \\
        --additional-config '{"infinigen": {"budget": 0.2, "alpha": 5}}'

and are validated once, at start-up, into the frozen :class:`InfiniGenConfig`.
A wrong name or value raises a plain ``ValueError`` that names the option and
its allowed range. This module imports neither vLLM nor torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm_infinigen.engine.policies.registry import POLICIES

#: Key of our options inside vLLM's ``additional_config`` dict.
ADDITIONAL_CONFIG_KEY = "infinigen"

#: How decode reads the selected blocks (engine/runtime.py): ``in_place``
#: (the kernel reads them where they lie in the host tier), or through a
#: staging buffer they are copied into, inline (``sync``) or on a worker
#: thread (``thread``, the CPU stand-in for a CUDA side stream).
SWAP_MODES: tuple[str, ...] = ("in_place", "sync", "thread")

#: How InfiniGen turns the speculated logits of the query heads sharing a KV
#: head into one block score (``method/scoring.py``'s ``BlockScoreRule``);
#: ``auto`` picks one from the keys that are scored.
SCORE_RULES: tuple[str, ...] = ("auto", "log_mass", "max")

#: With ``partial_ratio`` unset, models whose sparse layers are at most this
#: share of their attention layers score whole keys at 16 bits (hybrid models
#: such as Gemma 3, whose few global layers are the sparse ones); the others
#: score whole keys at 4 bits (:meth:`InfiniGenConfig.for_model`).
WHOLE_KEYS_MAX_SPARSE_SHARE = 0.25

#: The share of each head's channels in the partial keys when not every
#: channel is kept (``partial_ratio`` unset with ``partial_dtype`` a float
#: type on a model with many sparse layers; also ``method/calibration.py``'s
#: default): 20 of 64 on
#: Qwen2.5-0.5B, +2 points mean recall and +16 on the worst layer over 0.2
#: (docs/method.md, recall.json).
PARTIAL_RATIO = 0.3

#: How the KV heads' block scores become one per block, since every KV head
#: reads the same blocks (``method/selection.py``'s ``HeadReduction``).
HEAD_REDUCTIONS: tuple[str, ...] = ("mean", "max", "per_head")

#: Storage type of the device partial-key cache (``auto``: the KV cache's;
#: ``int4``: packed 4-bit codes with a scale per token and KV head).
PARTIAL_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16", "int4")

#: Which query InfiniGen scores the partial keys with.
QUERY_SOURCES: tuple[str, ...] = ("auto", "speculated", "real")

#: How calibration ranks a head's channels for the partial keys
#: (``method/skew.py``'s ``ChannelCriterion``).
PARTIAL_CHANNELS: tuple[str, ...] = ("query", "query_key", "query_key_spread")


#: Options the runtime may change while serving (``infinigen_configure``,
#: ``POST /infinigen/config``);
#: the others size memory or calibration and are fixed at start-up.
RUNTIME_OPTIONS: tuple[str, ...] = (
    "policy",
    "budget",
    "max_blocks",
    "alpha",
    "sink_blocks",
    "recent_blocks",
    "min_blocks",
    "sparse_min_tokens",
    "swap_mode",
    "score_rule",
    "head_reduction",
    "query_source",
    "residual_means",
    "recall_sample_rate",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class InfiniGenConfig:
    """Options of the INFINIGEN attention backend (all have working defaults).

    ``budget`` follows the paper's accuracy setting (~20% of the KV);
    ``alpha`` and ``partial_ratio`` come from the method's measurements on
    Qwen2.5-Coder-0.5B (``benchmarks/recall.py``, ``docs/method.md``).
    """

    budget: float = 0.2
    """Fraction of a request's KV blocks fetched per layer at decode, in
    (0, 1]. 1.0 (without ``max_blocks``) fetches every block whatever
    ``alpha`` says, and is exact."""

    max_blocks: int | None = None
    """Optional cap on blocks fetched per request per layer (>= 1); the
    smaller of this and ``budget`` wins. None: no cap besides ``budget``."""

    alpha: float = 8.0
    """Speculation threshold in nats of speculated block log-mass (the
    ``log_mass`` rule only): blocks within ``alpha`` of the request's best
    block are candidates, > 0. At 8
    it never removes a block a 20-30% budget keeps on the test model, and
    prunes blocks under e^-8 of the best block's mass when attention is
    peaky (docs/method.md)."""

    partial_ratio: float | None = None
    """Fraction of each head's channels kept in the device partial-key cache
    and used by speculation, in (0, 1]. None: chosen per model at start-up
    (:meth:`for_model`): whole keys (1.0) everywhere, in 16 bits when the
    sparse layers are at most a quarter of the attention layers (hybrid
    models: Gemma 3 270M, 3 of 18), else packed at 4 bits (``partial_dtype``
    ``int4``; Qwen2.5-Coder-0.5B, 23 of 24). Few sparse layers carry every
    long-range read and are scored by their peak logit, which wants the keys'
    own precision; with every layer sparse, whole keys at 4 bits rank blocks
    closer to the exact masses than 30% of the channels in bfloat16, in less
    memory (34 bytes per token and KV head against 40 at head_dim 64) and,
    with the CPU scorer's integer dot products, no more time
    (``benchmarks/speculation_cost.py``; ``docs/method.md``, "Whole keys at 4
    bits by default"). With ``partial_dtype`` set to a float type on such a
    model, 0.3 (:data:`PARTIAL_RATIO`). Fixed at start-up."""

    sink_blocks: int = 1
    """Leading blocks of every request always fetched (attention sinks), >= 0."""

    recent_blocks: int = 1
    """Trailing blocks always fetched (the newest, partly filled block is
    always among them), >= 1."""

    min_blocks: int = 8
    """A request's block budget never falls below this many blocks, and a
    request with at most this many blocks reads them all, >= 0. With 32-token
    blocks, prompts and chats under 256 tokens stay exact; without the floor a
    20% budget reads only the sink and newest blocks of a 3-block request and
    loses the text between them."""

    sparse_min_tokens: int | None = None
    """A decode step whose requests hold fewer context tokens than this, in
    total, reads every block (vLLM's dense path): below it, choosing the
    blocks costs more than reading them all. >= 0, or None for the
    platform's choice: on CPU measured at start-up on the machine the engine
    runs on (``engine/cost_probe.py``: vLLM's kernel over every block against
    scoring, selecting and reading the budget's blocks, at the engine's block
    size and partial-key type; sparse only where it is predicted to save at
    least a tenth of the kernel's time; never, if it does not pay there);
    on CUDA 0. 0 selects at every length."""

    dense_layers: tuple[int, ...] = (0,)
    """Layer indices that keep vLLM's dense decode attention (layer 0 has no
    previous layer to speculate from). Non-negative, below the layer count."""

    host_pool_gib: float | None = None
    """Size of the host swap space holding every KV block, in GiB (> 0).
    None: vLLM's own KV cache sizing decides."""

    policy: str = "infinigen"
    """Block-selection policy, one of :data:`POLICIES` (the registry in
    ``engine/policies/registry.py``): ``infinigen`` (the paper's
    speculation), ``quest`` (per-block key bounds and the layer's real
    query), ``h2o`` (accumulated attention mass plus a recent window),
    ``streaming`` (sink plus newest blocks), ``dense`` (every block: exact)."""

    swap_mode: str = "in_place"
    """How decode reads the selected blocks, one of :data:`SWAP_MODES`:
    ``in_place`` (the paged kernel reads them where they lie in the host
    tier through a compacted block table: no copy; the CPU default, where
    both tiers share one DRAM), ``sync`` (copied into a staging buffer
    inline) or ``thread`` (copied on a worker thread overlapping the
    previous layer's compute). The staging modes are the GPU's shape, where
    the kernel cannot read host memory."""

    score_rule: str = "auto"
    """How InfiniGen scores a block from the query heads that share a KV
    head, one of :data:`SCORE_RULES`: ``log_mass`` (the log of their mean
    speculated attention mass in the block), ``max`` (the largest
    speculated logit: the paper's token rule lifted to blocks; ``alpha``
    does not apply) or ``auto``: ``max`` when whole keys are scored
    (``partial_ratio`` 1.0) at 16 or 32 bits, else ``log_mass``. A block's
    peak is one token's logit: with exact keys it ranks best on both test
    models and keeps a pass key's block, with estimated keys its error on
    that token moves the block, where mass averages the error out
    (``docs/method.md``)."""

    head_reduction: str = "mean"
    """How the KV heads' block scores become one per block, one of
    :data:`HEAD_REDUCTIONS`: ``mean`` (mean mass over KV heads), ``max``
    (the largest), ``per_head`` (each block at its best head's margin below
    that head's best block)."""

    residual_means: bool = True
    """Add each block's residual term to InfiniGen's block scores: the
    skewed channels the partial keys leave out, taken at the block's mean
    key (a sum per block and KV head, kept with the partial keys; its
    product with the query costs per block, not per token). It lifts the
    selection's attention-mass recall at 20% from 0.82 to 0.91 on
    Qwen2.5-Coder-0.5B (``docs/method.md``, "Residual block means").
    ``false``: partial channels only (the paper's estimate)."""

    partial_dtype: str = "auto"
    """Storage type of the partial-key cache, one of :data:`PARTIAL_DTYPES`.
    ``auto``: ``int4`` where :meth:`for_model` chooses whole keys at 4 bits
    (``partial_ratio`` unset on a model with many sparse layers), else
    ``bfloat16`` for float32 keys and the keys' own type otherwise. Half
    precision halves the cache's memory and what speculation reads per step
    (the fused CPU scorer: 2.6 -> 2.1 ms per layer at 16K x 4,
    ``benchmarks/speculation_cost.py``), at a rounding far below the
    partial channels' own approximation. ``int4``: each token and KV head's
    partial key as symmetric 4-bit codes (``round(k / scale)`` in [-7, 7],
    ``scale = max |k| / 7``) packed two per byte, with its float16 scale:
    ``ceil(d_partial / 2) + 2`` bytes (``method/quant4.py``). Meant with
    ``partial_ratio: 1.0``, the whole key at 4 bits: head_dim 64 takes 34
    bytes where 30% of the channels in bfloat16 take 40 (head_dim 256: 130
    against 154), and ranks blocks closer to the exact masses
    (``docs/method.md``, "Whole keys at 4 bits"); it works at any ratio.
    The CPU scorer scores packed keys with the query at 8 bits, in integer
    dot products (``method/quant4.py``'s ``quantize_query``). Fixed at
    start-up."""

    query_source: str = "auto"
    """Which query InfiniGen scores the partial keys with, one of
    :data:`QUERY_SOURCES`: ``speculated`` (the paper's: layer ``L``'s query
    predicted from layer ``L-1``'s input, one layer ahead, so that a staging
    copy overlaps the previous layer), ``real`` (the layer's own query, at
    its attention: no speculation error and no extra query projection, but
    no lead time), ``auto`` (``real`` when the kernel reads in place, where
    there is no copy to overlap; ``speculated`` with staging)."""

    partial_channels: str = "query"
    """How calibration picks each head's partial channels, one of
    :data:`PARTIAL_CHANNELS`: ``query`` (largest mean ``|query|`` after the
    skew, as the paper's code does), ``query_key`` (largest ``|query| *
    |key|``, as the paper's text describes) or ``query_key_spread`` (query
    energy times the keys' spread within blocks, the part the residual
    block term cannot carry). Fixed at start-up."""

    recall_sample_rate: float = 0.01
    """Share of sparse decode steps on which the engine measures its
    selection's recall, in [0, 1]: for one sparse layer and one decode
    request of the step (in turn), the share of the exact attention mass
    that the selected blocks hold, exported as a metric (the method's health
    signal; ``docs/operations.md``). It reads that request's keys once: at
    0.01, well under 0.1% of decode time. 0 turns it off."""

    http_reconfigure: bool = False
    """Let ``POST /infinigen/config`` of ``vllm serve`` change the run-time
    options while serving (the API needs ``VLLM_PLUGINS`` to name
    ``infinigen_api``). Off: the endpoint answers 403. Fixed at start-up."""

    calibration_file: str | None = None
    """Text file used to calibrate the skew matrices and partial channels.
    None: the built-in default text (see ``docs/method.md``)."""

    def __post_init__(self) -> None:
        _check_range("budget", self.budget, low=0.0, low_open=True, high=1.0)
        if self.max_blocks is not None and (
            not _is_int(self.max_blocks) or self.max_blocks < 1
        ):
            raise ValueError(
                f"infinigen option 'max_blocks' must be an integer >= 1 or null, "
                f"got {self.max_blocks!r}"
            )
        _check_range("alpha", self.alpha, low=0.0, low_open=True, high=math.inf)
        if self.partial_ratio is not None:
            _check_range(
                "partial_ratio", self.partial_ratio, low=0.0, low_open=True, high=1.0
            )
        _check_int("sink_blocks", self.sink_blocks, minimum=0)
        _check_int("recent_blocks", self.recent_blocks, minimum=1)
        _check_int("min_blocks", self.min_blocks, minimum=0)
        if self.sparse_min_tokens is not None:
            _check_int("sparse_min_tokens", self.sparse_min_tokens, minimum=0)
        if not isinstance(self.dense_layers, tuple) or not all(
            _is_int(i) and i >= 0 for i in self.dense_layers
        ):
            raise ValueError(
                "infinigen option 'dense_layers' must be a list of layer indices "
                f">= 0, got {self.dense_layers!r}"
            )
        if self.host_pool_gib is not None:
            _check_range(
                "host_pool_gib",
                self.host_pool_gib,
                low=0.0,
                low_open=True,
                high=math.inf,
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"infinigen option 'policy' must be one of {list(POLICIES)}, "
                f"got {self.policy!r}"
            )
        if self.swap_mode not in SWAP_MODES:
            raise ValueError(
                f"infinigen option 'swap_mode' must be one of {list(SWAP_MODES)}, "
                f"got {self.swap_mode!r}"
            )
        for name, allowed in (
            ("score_rule", SCORE_RULES),
            ("head_reduction", HEAD_REDUCTIONS),
            ("query_source", QUERY_SOURCES),
            ("partial_dtype", PARTIAL_DTYPES),
            ("partial_channels", PARTIAL_CHANNELS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"infinigen option {name!r} must be one of {list(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        _check_range("recall_sample_rate", self.recall_sample_rate, low=0.0, high=1.0)
        for flag in ("residual_means", "http_reconfigure"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"infinigen option {flag!r} must be true or false, "
                    f"got {getattr(self, flag)!r}"
                )
        if self.calibration_file is not None and (
            not isinstance(self.calibration_file, str) or not self.calibration_file
        ):
            raise ValueError(
                "infinigen option 'calibration_file' must be a path string or "
                f"null, got {self.calibration_file!r}"
            )

    @property
    def is_exact(self) -> bool:
        """True when every block is fetched at every layer (dense results)."""
        return self.policy == "dense" or (
            self.budget >= 1.0 and self.max_blocks is None
        )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> InfiniGenConfig:
        """Build from the user's ``{"infinigen": {...}}`` dict (keys may use
        dashes or underscores). Unknown keys are rejected with the known list.
        """
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ValueError(
                f"--additional-config '{ADDITIONAL_CONFIG_KEY}' must be a JSON "
                f"object of options, got {type(options).__name__}"
            )
        known = cls.option_names()
        kwargs: dict[str, Any] = {}
        for raw_key, value in options.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ValueError(
                    f"unknown infinigen option {raw_key!r}; known options: "
                    f"{', '.join(known)}"
                )
            if key == "dense_layers" and isinstance(value, list | tuple):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | Any | None
    ) -> InfiniGenConfig:
        """Extract and validate our options from vLLM's ``additional_config``."""
        if not isinstance(additional_config, Mapping):
            return cls()
        return cls.from_dict(additional_config.get(ADDITIONAL_CONFIG_KEY))

    def check_model(self, num_layers: int) -> None:
        """Validate the options that depend on the model (its layer count)."""
        bad = [i for i in self.dense_layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"infinigen option 'dense_layers' has {bad}, but the model has "
                f"{num_layers} layers (allowed: 0..{num_layers - 1})"
            )

    def for_model(self, sparse_layers: int, attention_layers: int) -> InfiniGenConfig:
        """This configuration with the partial keys chosen for a model with
        ``sparse_layers`` of its ``attention_layers`` sparse, when
        ``partial_ratio`` is unset: whole keys, at 16 bits (``partial_dtype``
        ``auto``) when the sparse layers are at most
        :data:`WHOLE_KEYS_MAX_SPARSE_SHARE` of the attention layers, else at
        4 bits (``int4``); with ``partial_dtype`` set to a float type on such
        a model, :data:`PARTIAL_RATIO` of the channels."""
        if self.partial_ratio is not None:
            return self
        few = sparse_layers <= WHOLE_KEYS_MAX_SPARSE_SHARE * attention_layers
        if few or self.partial_dtype == "int4":
            return dataclasses.replace(self, partial_ratio=1.0)
        if self.partial_dtype == "auto":
            return dataclasses.replace(self, partial_ratio=1.0, partial_dtype="int4")
        return dataclasses.replace(self, partial_ratio=PARTIAL_RATIO)

    @property
    def whole_keys(self) -> bool:
        """Speculation scores every key channel at 16 or 32 bits."""
        return self.partial_ratio == 1.0 and self.partial_dtype != "int4"

    @property
    def block_score_rule(self) -> str:
        """``score_rule`` with ``auto`` resolved (``max`` or ``log_mass``)."""
        if self.score_rule != "auto":
            return self.score_rule
        return "max" if self.whole_keys else "log_mass"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self, options: Mapping[str, Any]) -> InfiniGenConfig:
        """This configuration with some run-time options changed, validated
        as at start-up; an option fixed at start-up (or unknown) is refused
        with a message naming it."""
        if not isinstance(options, Mapping):
            raise ValueError(
                f"infinigen options must be a JSON object, got {type(options).__name__}"
            )
        names = self.option_names()
        fixed = [
            key
            for key in options
            if str(key).replace("-", "_") in names
            and str(key).replace("-", "_") not in RUNTIME_OPTIONS
        ]
        if fixed:
            raise ValueError(
                f"infinigen option {fixed[0]!r} is fixed at start-up; options "
                f"that can change while serving: {', '.join(RUNTIME_OPTIONS)}"
            )
        merged = self.to_dict()
        merged.update({str(key).replace("-", "_"): v for key, v in options.items()})
        return type(self).from_dict(merged)  # rejects unknown names

    def describe(self) -> str:
        """One line with every effective option, for the start-up log."""
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _check_range(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = _is_number(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        ok = above and below
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(
            f"infinigen option {name!r} must be a number in {left}{low}, {high}"
            f"{right}, got {value!r}"
        )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(
            f"infinigen option {name!r} must be an integer >= {minimum}, got {value!r}"
        )


DEFAULT_CONFIG = InfiniGenConfig()


def check_parallel_layout(pipeline_parallel_size: int) -> None:
    """Refuse the parallel layouts INFINIGEN does not run (``docs/
    deployment.md``). Tensor parallel runs, each rank speculating for its
    own heads; pipeline parallel does not: the first layer of every later
    stage would have to speculate from a layer on another stage."""
    if pipeline_parallel_size > 1:
        raise ValueError(
            "--attention-backend infinigen does not support pipeline parallelism "
            f"(pipeline_parallel_size={pipeline_parallel_size}; allowed: 1). "
            "Use --tensor-parallel-size to spread a model over devices."
        )


def check_model_support(
    *,
    architecture: str,
    use_mla: bool = False,
    is_encoder_decoder: bool = False,
    is_attention_free: bool = False,
    runner_type: str = "generate",
) -> None:
    """Refuse the models INFINIGEN cannot serve, naming what is unsupported.

    INFINIGEN chooses the KV blocks a decoder's self-attention reads while
    it generates. A model without that attention, or whose KV is not one key
    and one value per head (multi-head latent attention keeps a compressed
    latent instead), has nothing it can speculate on; a pooling runner never
    decodes.
    """
    reason = ""
    if use_mla:
        reason = (
            "multi-head latent attention (MLA) is not supported: its KV cache "
            "holds a compressed latent, not the per-head keys INFINIGEN scores"
        )
    elif is_attention_free:
        reason = "the model has no attention layers"
    elif is_encoder_decoder:
        reason = (
            "encoder-decoder models are not supported (cross-attention); "
            "decoder-only models are"
        )
    elif runner_type == "pooling":
        reason = (
            "--runner pooling is not supported (allowed: generate): INFINIGEN "
            "selects KV blocks at decode, which embedding, classification and "
            "encoder-only models never do"
        )
    if reason:
        raise ValueError(
            f"--attention-backend infinigen cannot serve {architecture}: {reason}. "
            "Serve this model with vLLM's default attention backend."
        )
