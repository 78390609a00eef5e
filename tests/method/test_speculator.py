"""Speculated partial queries, partial keys and the RoPE helper."""

from __future__ import annotations

import pytest
import torch

from tests.method.reference_twins import ref_speculate
from vllm_infinigen.method.calibration import AttentionProjection
from vllm_infinigen.method.rotary import NeoxRotary, apply_neox_rotary, rotate_half
from vllm_infinigen.method.skew import fit_layer_skew
from vllm_infinigen.method.speculator import HeadShard, LayerSpeculator

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 6, 2, 16


def _rms_head_norm(x: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(0.5, 1.5, x.shape[-1])
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _projection(
    rope: NeoxRotary | None, q_norm: bool = False, seed: int = 0
) -> AttentionProjection:
    g = torch.Generator().manual_seed(seed)
    return AttentionProjection(
        q_weight=torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=g) / 7,
        q_bias=torch.randn(HEADS * HEAD_DIM, generator=g),
        k_weight=torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g) / 7,
        k_bias=torch.randn(KV_HEADS * HEAD_DIM, generator=g),
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rope=rope,
        q_norm=_rms_head_norm if q_norm else None,
        k_norm=_rms_head_norm if q_norm else None,
    )


def _speculator(
    proj: AttentionProjection, ratio: float = 0.25, tokens: int = 120
) -> tuple[LayerSpeculator, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, HIDDEN, generator=g)
    pos = torch.arange(tokens)
    layer = fit_layer_skew(proj.queries(x, pos), proj.keys(x, pos), partial_ratio=ratio)
    spec = LayerSpeculator.build(
        layer,
        q_weight=proj.q_weight,
        q_bias=proj.q_bias,
        num_heads=HEADS,
        rope=proj.rope,
        q_norm=proj.q_norm,
    )
    return spec, x, pos


@pytest.mark.parametrize(
    ("rope", "q_norm"),
    [(NeoxRotary(HEAD_DIM), False), (NeoxRotary(HEAD_DIM), True), (None, False)],
    ids=["rope", "rope+q_norm", "no-rope"],
)
def test_speculate_matches_reference(rope: NeoxRotary | None, q_norm: bool) -> None:
    proj = _projection(rope, q_norm)
    spec, x, pos = _speculator(proj)
    assert spec.folded == (rope is None and not q_norm)
    x_new = torch.randn(5, HIDDEN)
    positions = torch.tensor([3, 77, 500, 1, 1024])
    out = spec.speculate(x_new, positions)
    assert out.shape == (5, HEADS, spec.d_partial)
    expected = ref_speculate(
        x_new,
        positions,
        proj.q_weight,
        proj.q_bias,
        spec.layer_skew.skew,
        spec.layer_skew.channels,
        HEADS,
        proj.rope,
        proj.q_norm,
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_folded_equals_full_query_path() -> None:
    proj = _projection(None)
    folded, x, pos = _speculator(proj)
    assert folded.folded
    assert folded.query_weight.shape == (HEADS * folded.d_partial, HIDDEN)
    unfolded = LayerSpeculator(
        layer_skew=folded.layer_skew,
        num_heads=HEADS,
        query_weight=proj.q_weight,
        query_bias=proj.q_bias,
        key_basis=folded.key_basis,
        rope=None,
        q_norm=None,
        folded=False,
    )
    torch.testing.assert_close(
        folded.speculate(x, pos), unfolded.speculate(x, pos), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("rope", [NeoxRotary(HEAD_DIM, base=500.0), None])
def test_full_ratio_reproduces_attention_logits(rope: NeoxRotary | None) -> None:
    """With every channel kept and x = the layer's own input, q'.k' = q.k."""
    proj = _projection(rope, seed=2)
    spec, x, pos = _speculator(proj, ratio=1.0)
    q_partial = spec.speculate(x, pos)  # [T, H, D]
    k_partial = spec.partial_keys(proj.keys(x, pos))  # [T, KV, D]
    q, k = proj.queries(x, pos), proj.keys(x, pos)
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        torch.testing.assert_close(
            q_partial[:, h] @ k_partial[:, h // group].T,
            q[:, h] @ k[:, h // group].T,
            atol=2e-3,
            rtol=1e-4,
        )


def test_partial_keys_are_skewed_columns() -> None:
    proj = _projection(NeoxRotary(HEAD_DIM))
    spec, x, pos = _speculator(proj)
    keys = proj.keys(x, pos)
    out = spec.partial_keys(keys)
    assert out.shape == (x.shape[0], KV_HEADS, spec.d_partial)
    for g in range(KV_HEADS):
        channels = spec.layer_skew.channels[g]
        expected = (keys[:, g] @ spec.layer_skew.skew[g])[:, channels]
        torch.testing.assert_close(out[:, g], expected, atol=1e-5, rtol=1e-5)


def test_build_rejects_wrong_shapes() -> None:
    proj = _projection(None)
    spec, _, _ = _speculator(proj)
    with pytest.raises(ValueError, match="rows"):
        LayerSpeculator.build(
            spec.layer_skew, q_weight=proj.q_weight[:-1], q_bias=None, num_heads=HEADS
        )
    with pytest.raises(ValueError, match="multiple"):
        LayerSpeculator.build(
            spec.layer_skew, q_weight=proj.q_weight, q_bias=None, num_heads=5
        )


def test_neox_rotary_matches_transformers() -> None:
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    rope = NeoxRotary(HEAD_DIM, base=10000.0)
    positions = torch.tensor([0, 5, 300])
    x = torch.randn(3, 4, HEAD_DIM)
    cos, sin = rope.tables(positions)
    expected, _ = qwen2.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
    torch.testing.assert_close(rope(positions, x), expected)
    torch.testing.assert_close(apply_neox_rotary(x, cos, sin), expected)


def test_rotary_depends_on_relative_position_only() -> None:
    rope = NeoxRotary(HEAD_DIM)
    q = torch.randn(1, 1, HEAD_DIM)
    k = torch.randn(1, 1, HEAD_DIM)

    def logit(pq: int, pk: int) -> torch.Tensor:
        return (rope(torch.tensor([pq]), q) * rope(torch.tensor([pk]), k)).sum()

    torch.testing.assert_close(logit(10, 3), logit(107, 100), atol=1e-4, rtol=1e-4)
    assert torch.equal(
        rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])),
        torch.tensor([-3.0, -4.0, 1.0, 2.0]),
    )


@pytest.mark.parametrize("rope", [NeoxRotary(HEAD_DIM), None])
def test_partial_and_residual_channels_make_the_whole_logit(
    rope: NeoxRotary | None,
) -> None:
    """The residual channels are the skewed channels the partial keys leave
    out: partial plus residual products give the exact logits."""
    proj = _projection(rope, seed=3)
    spec, x, pos = _speculator(proj, ratio=0.25)
    assert spec.d_partial + spec.d_residual == HEAD_DIM
    q, k = proj.queries(x, pos), proj.keys(x, pos)
    logits = spec.partial_query(q).unsqueeze(2) @ spec.partial_keys(
        k
    ).repeat_interleave(HEADS // KV_HEADS, dim=1).permute(1, 2, 0).unsqueeze(0)
    residual = spec.residual_query(q).unsqueeze(2) @ spec.residual_keys(
        k
    ).repeat_interleave(HEADS // KV_HEADS, dim=1).permute(1, 2, 0).unsqueeze(0)
    exact = q.unsqueeze(2) @ k.repeat_interleave(HEADS // KV_HEADS, dim=1).permute(
        1, 2, 0
    ).unsqueeze(0)
    torch.testing.assert_close(logits + residual, exact, atol=2e-3, rtol=1e-4)
    assert not torch.allclose(logits, exact, atol=1e-2)  # the partial part alone is not


def test_speculate_full_is_the_rotated_query() -> None:
    proj = _projection(NeoxRotary(HEAD_DIM), seed=4)
    spec, x, pos = _speculator(proj)
    full = spec.speculate_full(x, pos)
    assert full is not None
    torch.testing.assert_close(spec.partial_query(full), spec.speculate(x, pos))
    torch.testing.assert_close(full, proj.queries(x, pos), atol=1e-4, rtol=1e-4)
    folded, _, _ = _speculator(_projection(None, seed=4))
    assert folded.folded and folded.speculate_full(x, pos) is None


@pytest.mark.parametrize(
    ("tp", "expected"),
    [
        # 6 query heads, 2 KV heads (group of 3).
        (1, [(range(0, 6), range(0, 2))]),
        (2, [(range(0, 3), range(0, 1)), (range(3, 6), range(1, 2))]),
        # More ranks than KV heads: each KV head on 3 consecutive ranks.
        (
            6,
            [(range(r, r + 1), range(r // 3, r // 3 + 1)) for r in range(6)],
        ),
    ],
)
def test_head_shard_follows_the_tensor_parallel_split(
    tp: int, expected: list[tuple[range, range]]
) -> None:
    got = [HeadShard.of_rank(HEADS, KV_HEADS, tp, r) for r in range(tp)]
    assert [(s.query_heads, s.kv_heads) for s in got] == expected
    for shard in got:  # every query head reads its own group's KV head
        group = HEADS // KV_HEADS
        assert {h // group for h in shard.query_heads} == set(shard.kv_heads)


@pytest.mark.parametrize(
    ("tp", "rank", "message"),
    [
        (4, 0, "does not divide the 6 query heads"),
        (3, 0, "neither divides"),
        (2, 2, "rank 2 outside"),
    ],
)
def test_head_shard_refuses_impossible_splits(tp: int, rank: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HeadShard.of_rank(HEADS, KV_HEADS, tp, rank)


@pytest.mark.parametrize(
    ("rope", "q_norm"),
    [(NeoxRotary(HEAD_DIM), False), (NeoxRotary(HEAD_DIM), True), (None, False)],
)
@pytest.mark.parametrize("tp", [2, 6])
def test_rank_shard_computes_its_heads_of_the_whole(
    rope: NeoxRotary | None, q_norm: bool, tp: int
) -> None:
    """A rank's speculator gives exactly its heads' slice of the whole layer's
    speculated queries, partial keys and residual channels."""
    proj = _projection(rope, q_norm)
    spec, x, pos = _speculator(proj)
    keys = proj.keys(x, pos)
    whole_q = spec.speculate(x, pos)
    whole_k = spec.partial_keys(keys)
    query = proj.queries(x, pos)
    whole_rq = spec.residual_query(query)
    whole_rk = spec.residual_keys(keys)
    for rank in range(tp):
        heads = HeadShard.of_rank(HEADS, KV_HEADS, tp, rank)
        part = spec.shard(heads)
        q_slice = slice(heads.query_heads.start, heads.query_heads.stop)
        kv_slice = slice(heads.kv_heads.start, heads.kv_heads.stop)
        assert (part.num_heads, part.num_kv_heads) == (
            len(heads.query_heads),
            len(heads.kv_heads),
        )
        torch.testing.assert_close(
            part.speculate(x, pos), whole_q[:, q_slice], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            part.partial_keys(keys[:, kv_slice]), whole_k[:, kv_slice]
        )
        torch.testing.assert_close(
            part.residual_query(query[:, q_slice]), whole_rq[:, q_slice]
        )
        torch.testing.assert_close(
            part.residual_keys(keys[:, kv_slice]), whole_rk[:, kv_slice]
        )


def test_shard_refuses_another_layers_split() -> None:
    spec, _, _ = _speculator(_projection(NeoxRotary(HEAD_DIM)))
    with pytest.raises(ValueError, match="shard of 8 query / 2 KV heads"):
        spec.shard(HeadShard.of_rank(8, KV_HEADS, 2, 0))
