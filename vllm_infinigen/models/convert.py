"""Turn a GGUF file into a Hugging Face folder that vLLM loads.

transformers (with the ``gguf`` package) dequantises the GGUF into an ordinary
PyTorch model and builds a tokenizer from the GGUF vocabulary. It refuses to
``save_pretrained`` such a model, so the weights (bfloat16 safetensors), the
config and the generation config are written here by hand; the tokenizer is
saved by transformers after the fixes a spec asks for.

Heavy imports (torch, transformers, safetensors) happen inside the functions so
that importing this package stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .specs import ModelSpec
from .templates import CHAT_TEMPLATES

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"

#: Keys of the in-memory config that must not reach ``config.json``.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")
#: Environment variables that keep huggingface_hub and transformers offline.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid Hugging Face hub access while converting (restored afterwards)."""
    saved = {key: os.environ.get(key) for key in _OFFLINE_VARS}
    os.environ.update(dict.fromkeys(_OFFLINE_VARS, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _set_progress_bars(progress: bool) -> None:
    """Show transformers' progress bars only when ``progress`` is set."""
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def load_tokenizer(gguf_path: Path) -> Any:
    """Tokenizer built by transformers from the GGUF vocabulary."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )


def load_model(gguf_path: Path) -> Any:
    """The GGUF as a float32 transformers model (eval mode; fastest to load)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        local_files_only=True,
    )
    return model.eval()


def weights_to_save(model: Any) -> dict[str, Any]:
    """The model's tensors as contiguous bfloat16, each shared tensor once.

    With tied embeddings ``lm_head.weight`` is the embedding matrix; it is left
    out (vLLM and transformers re-tie it from ``tie_word_embeddings``).
    """
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tensors: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen or (tied and name == "lm_head.weight"):
            logger.debug("not writing %s (shares storage with %s)", name, seen.get(key))
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to(torch.bfloat16).contiguous()
    if not tied and "lm_head.weight" not in tensors:
        raise ValueError("untied model has no separate lm_head.weight to write")
    return tensors


def write_weights(model: Any, out_dir: Path) -> int:
    """Write ``model.safetensors``; return the number of tensors written."""
    from safetensors.torch import save_file

    tensors = weights_to_save(model)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return len(tensors)


def config_dict(model: Any, spec: ModelSpec) -> dict[str, Any]:
    """``config.json`` contents: the model config, unquantised, in bfloat16."""
    data = model.config.to_dict()
    for key in _DROPPED_CONFIG_KEYS:
        data.pop(key, None)
    model_type = data.get("model_type")
    if model_type != spec.model_type:
        raise ValueError(
            f"{spec.name}: transformers made model_type {model_type!r}, "
            f"expected {spec.model_type!r}"
        )
    data["architectures"] = [spec.architecture]
    data["dtype"] = "bfloat16"
    data["torch_dtype"] = "bfloat16"
    return data


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as indented, key-sorted JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def eos_token_ids(tokenizer: Any, spec: ModelSpec) -> list[int]:
    """The tokenizer's EOS id followed by the spec's extra stop tokens."""
    ids = [tokenizer.eos_token_id]
    for token in spec.extra_eos_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{spec.name}: tokenizer has no token {token!r}")
        if token_id not in ids:
            ids.append(token_id)
    return ids


def generation_config_dict(tokenizer: Any, spec: ModelSpec) -> dict[str, Any]:
    """Token ids only: no sampling defaults, so callers get what they ask for."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_token_ids(tokenizer, spec),
        "pad_token_id": tokenizer.pad_token_id,
    }


def force_bos(tokenizer: Any) -> None:
    """Make ``tokenizer`` prepend its BOS token to every encoded text."""
    from tokenizers import processors

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is None or bos_id is None:
        raise ValueError("tokenizer has no BOS token to add")
    tokenizer.add_bos_token = True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not starts_with_bos(tokenizer):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
    if not starts_with_bos(tokenizer):
        raise RuntimeError("could not make the tokenizer add its BOS token")


def starts_with_bos(tokenizer: Any) -> bool:
    """Whether encoding a short text starts with the BOS id."""
    ids = tokenizer("hi").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def prepare_tokenizer(tokenizer: Any, spec: ModelSpec) -> None:
    """Apply the spec's fixes: chat template fallback and forced BOS."""
    if not tokenizer.chat_template:
        if spec.fallback_chat_template is None:
            raise ValueError(f"{spec.name}: GGUF has no chat template")
        logger.info("GGUF has no chat template; using the built-in one")
        tokenizer.chat_template = CHAT_TEMPLATES[spec.fallback_chat_template]
    if spec.force_add_bos:
        force_bos(tokenizer)


def write_tokenizer(tokenizer: Any, spec: ModelSpec, out_dir: Path) -> None:
    """Save the tokenizer and check the saved copy behaves like the original."""
    tokenizer.save_pretrained(out_dir)
    if spec.force_add_bos:
        config_path = out_dir / "tokenizer_config.json"
        data = json.loads(config_path.read_text())
        data["add_bos_token"] = True
        write_json(data, config_path)
    check_saved_tokenizer(out_dir, spec)


def check_saved_tokenizer(out_dir: Path, spec: ModelSpec) -> None:
    """Reload the tokenizer from ``out_dir``: template present, BOS as required."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if not reloaded.chat_template:
        raise RuntimeError(f"{spec.name}: saved tokenizer lost its chat template")
    if spec.force_add_bos and not starts_with_bos(reloaded):
        raise RuntimeError(f"{spec.name}: saved tokenizer does not add BOS")


def smoke_test(model: Any, tokenizer: Any, spec: ModelSpec) -> str:
    """Greedy-decode a few tokens of the spec's prompt; fail on non-finite logits."""
    import torch

    inputs = tokenizer(spec.smoke_prompt, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError(f"{spec.name}: converted model gives non-finite logits")
        out = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :])
    logger.info("smoke test: %r -> %r", spec.smoke_prompt, text)
    return text


def convert(gguf_path: Path, out_dir: Path, spec: ModelSpec, progress: bool) -> None:
    """Write the Hugging Face folder of ``spec`` into ``out_dir`` (must exist)."""
    with _offline():
        _set_progress_bars(progress)
        _convert(gguf_path, out_dir, spec)


def _convert(gguf_path: Path, out_dir: Path, spec: ModelSpec) -> None:
    logger.info("building tokenizer from %s", gguf_path.name)
    tokenizer = load_tokenizer(gguf_path)
    prepare_tokenizer(tokenizer, spec)
    write_tokenizer(tokenizer, spec, out_dir)
    write_json(
        generation_config_dict(tokenizer, spec), out_dir / "generation_config.json"
    )

    logger.info("dequantising %s with transformers (about a minute)", gguf_path.name)
    model = load_model(gguf_path)
    write_json(config_dict(model, spec), out_dir / "config.json")
    count = write_weights(model, out_dir)
    logger.info("wrote %d tensors to %s", count, WEIGHTS_FILE)
    smoke_test(model, tokenizer, spec)
