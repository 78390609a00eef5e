"""Skew matrices, partial channels and the no-RoPE fold."""

from __future__ import annotations

import pytest
import torch

from tests.method.reference_twins import ref_channels, ref_skew
from vllm_infinigen.method.skew import (
    SPREAD_BLOCK,
    ChannelCriterion,
    LayerSkew,
    channel_scores,
    compute_skew,
    fit_layer_skew,
    fold_skew_into_projection,
    group_queries,
    identity_skew,
    partial_dim,
    top_channels,
)


def _calibration(
    tokens: int, num_heads: int, num_kv: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries/keys with uneven, correlated channel energy, like real ones."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=g))[0]
    spread = torch.logspace(1, -1, head_dim)
    q = (torch.randn(tokens, num_heads, head_dim, generator=g) * spread) @ mix
    k = (torch.randn(tokens, num_kv, head_dim, generator=g) * spread.flip(0)) @ mix
    return q + 0.3, k - 0.2  # a bias, as Qwen2's q/k biases give


@pytest.mark.parametrize(("num_heads", "num_kv"), [(4, 4), (6, 2), (8, 1)])
def test_skew_is_orthogonal_and_preserves_logits(num_heads: int, num_kv: int) -> None:
    q, k = _calibration(300, num_heads, num_kv, 32)
    a = compute_skew(q, k)
    assert a.shape == (num_kv, 32, 32)
    assert a.dtype == torch.float32
    eye = torch.eye(32).expand(num_kv, 32, 32)
    torch.testing.assert_close(a @ a.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.transpose(1, 2) @ a, eye, atol=1e-5, rtol=0)
    group = num_heads // num_kv
    for h in range(num_heads):
        g = h // group
        skewed = (q[:, h] @ a[g]) @ (k[:, g] @ a[g]).T
        torch.testing.assert_close(skewed, q[:, h] @ k[:, g].T, atol=1e-3, rtol=1e-4)


def test_skew_matches_per_head_reference() -> None:
    q, k = _calibration(200, 6, 2, 16, seed=3)
    torch.testing.assert_close(compute_skew(q, k), ref_skew(q, k), atol=1e-5, rtol=0)


def test_skew_with_fewer_tokens_than_dims_is_still_orthogonal() -> None:
    q, k = _calibration(3, 2, 2, 16, seed=1)  # rank-deficient Q
    a = compute_skew(q, k)
    torch.testing.assert_close(
        a @ a.transpose(1, 2), torch.eye(16).expand(2, 16, 16), atol=1e-5, rtol=0
    )
    # 3 tokens x 1 head per group: rank 3; the null-space columns are any basis
    torch.testing.assert_close(a[..., :3], ref_skew(q, k)[..., :3], atol=1e-5, rtol=0)


def test_skew_concentrates_query_energy_in_leading_columns() -> None:
    q, k = _calibration(400, 4, 2, 32)
    a = compute_skew(q, k)
    grouped = group_queries(q, 2)
    skewed_energy = (grouped @ a).pow(2).sum(dim=1)  # [kv, d]
    raw_energy = grouped.pow(2).sum(dim=1)
    top = 6

    def share(energy: torch.Tensor) -> torch.Tensor:
        return energy.topk(top, dim=-1).values.sum(-1) / energy.sum(-1)

    # Eckart-Young: no orthogonal basis puts more energy in `top` columns.
    sigma2 = torch.linalg.svdvals(grouped.double()).pow(2)
    optimum = sigma2[:, :top].sum(-1) / sigma2.sum(-1)
    torch.testing.assert_close(
        share(skewed_energy).double(), optimum, atol=1e-4, rtol=0
    )
    assert bool((share(skewed_energy) > share(raw_energy) + 0.1).all())


def test_skew_is_deterministic_and_sign_normalised() -> None:
    q, k = _calibration(120, 4, 2, 16)
    a1 = compute_skew(q, k)
    a2 = compute_skew(-q, -k)  # flips every singular vector's natural sign
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=0)
    pivots = a1.abs().argmax(dim=1, keepdim=True)
    assert bool((torch.gather(a1, 1, pivots) > 0).all())


def test_group_queries_stacks_heads_of_each_group() -> None:
    q = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    grouped = group_queries(q, 2)
    assert grouped.shape == (2, 4, 3)
    torch.testing.assert_close(grouped[1], torch.cat([q[:, 2], q[:, 3]]))
    with pytest.raises(ValueError, match="not divisible"):
        group_queries(torch.zeros(2, 3, 4), 2)


@pytest.mark.parametrize(
    ("ratio", "expected"), [(0.2, 13), (0.3, 20), (1.0, 64), (0.001, 1), (0.25, 16)]
)
def test_partial_dim(ratio: float, expected: int) -> None:
    assert partial_dim(64, ratio) == expected


def test_partial_dim_avoids_float_round_up() -> None:
    assert partial_dim(10, 0.3) == 3
    with pytest.raises(ValueError, match="partial_ratio"):
        partial_dim(64, 0.0)
    with pytest.raises(ValueError, match="partial_ratio"):
        partial_dim(64, 1.5)


@pytest.mark.parametrize("criterion", list(ChannelCriterion))
@pytest.mark.parametrize("skewed", [True, False])
def test_channels_match_reference(criterion: ChannelCriterion, skewed: bool) -> None:
    q, k = _calibration(150, 6, 3, 16, seed=5)
    layer = fit_layer_skew(q, k, partial_ratio=0.3, criterion=criterion, skew=skewed)
    expected = ref_channels(
        q,
        k,
        layer.skew,
        5,
        use_keys=criterion is ChannelCriterion.QUERY_KEY,
        spread_block=SPREAD_BLOCK
        if criterion is ChannelCriterion.QUERY_KEY_SPREAD
        else 0,
    )
    assert torch.equal(layer.channels, expected)
    if not skewed:
        assert torch.equal(layer.skew, identity_skew(3, 16))


def test_channel_ties_go_to_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert top_channels(scores, 2).tolist() == [[1, 2]]
    assert top_channels(scores, 4).tolist() == [[1, 2, 3, 4]]


def test_query_key_criterion_can_differ_from_query_only() -> None:
    # channel 0: big queries, tiny keys; channel 1: medium both.
    q = torch.zeros(10, 1, 3)
    k = torch.zeros(10, 1, 3)
    q[:, 0, 0], k[:, 0, 0] = 10.0, 0.01
    q[:, 0, 1], k[:, 0, 1] = 3.0, 3.0
    q[:, 0, 2], k[:, 0, 2] = 0.1, 0.1
    eye = identity_skew(1, 3)
    q_only = channel_scores(q, k, eye, ChannelCriterion.QUERY)
    assert top_channels(q_only, 1).item() == 0
    qk = channel_scores(q, k, eye, ChannelCriterion.QUERY_KEY)
    assert top_channels(qk, 1).item() == 1


def test_key_spread_criterion_leaves_out_block_constant_keys() -> None:
    """Channel 0 has the biggest queries but keys that are constant within
    each block (the residual block term carries them exactly); channel 1's
    keys vary inside blocks: the spread criterion keeps channel 1."""
    tokens = 4 * SPREAD_BLOCK
    q = torch.zeros(tokens, 1, 3)
    k = torch.zeros(tokens, 1, 3)
    q[:, 0, 0] = 10.0
    k[:, 0, 0] = torch.arange(tokens).div(SPREAD_BLOCK, rounding_mode="floor") * 5.0
    q[:, 0, 1] = 3.0
    k[:, 0, 1] = torch.linspace(-1, 1, tokens).sin() * 3 + (torch.arange(tokens) % 2)
    q[:, 0, 2] = 0.1
    eye = identity_skew(1, 3)
    assert (
        top_channels(channel_scores(q, k, eye, ChannelCriterion.QUERY), 1).item() == 0
    )
    spread = channel_scores(q, k, eye, ChannelCriterion.QUERY_KEY_SPREAD)
    assert spread[0, 0] == 0.0
    assert top_channels(spread, 1).item() == 1


def test_partial_basis_gathers_selected_columns() -> None:
    q, k = _calibration(100, 4, 2, 8)
    layer = fit_layer_skew(q, k, partial_ratio=0.5)
    basis = layer.partial_basis()
    assert basis.shape == (2, 8, 4)
    for g in range(2):
        torch.testing.assert_close(basis[g], layer.skew[g][:, layer.channels[g]])


def test_layer_skew_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        LayerSkew(
            skew=torch.zeros(2, 4, 4), channels=torch.zeros(3, 2, dtype=torch.long)
        )


def test_fold_keeps_attention_logits_without_rope() -> None:
    g = torch.Generator().manual_seed(7)
    hidden, num_heads, num_kv, head_dim = 24, 4, 2, 8
    wq = torch.randn(num_heads * head_dim, hidden, generator=g)
    bq = torch.randn(num_heads * head_dim, generator=g)
    wk = torch.randn(num_kv * head_dim, hidden, generator=g)
    bk = torch.randn(num_kv * head_dim, generator=g)
    x = torch.randn(50, hidden, generator=g)
    q = (x @ wq.T + bq).view(50, num_heads, head_dim)
    k = (x @ wk.T + bk).view(50, num_kv, head_dim)
    a = compute_skew(q, k)
    wq2, bq2 = fold_skew_into_projection(wq, bq, a, num_heads)
    wk2, bk2 = fold_skew_into_projection(wk, bk, a, num_kv)
    assert bq2 is not None and bk2 is not None
    q2 = (x @ wq2.T + bq2).view(50, num_heads, head_dim)
    k2 = (x @ wk2.T + bk2).view(50, num_kv, head_dim)
    for h in range(num_heads):
        torch.testing.assert_close(
            q2[:, h] @ k2[:, h // 2].T, q[:, h] @ k[:, h // 2].T, atol=1e-3, rtol=1e-4
        )
        torch.testing.assert_close(q2[:, h], q[:, h] @ a[h // 2], atol=1e-4, rtol=1e-4)
    wq_none, bq_none = fold_skew_into_projection(wq, None, a, num_heads)
    assert bq_none is None
    torch.testing.assert_close(wq_none, wq2)
