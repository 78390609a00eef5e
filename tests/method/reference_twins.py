"""Slow, obvious twins of the batched method functions.

Each twin loops over requests, heads, blocks and tokens in Python and follows
the written definition (module docstrings of ``vllm_infinigen.method``), so
the batched code can be compared against it.
"""

from __future__ import annotations

import math

import torch

from vllm_infinigen.method.rotary import HeadNormFn, RotaryFn


def ref_skew(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[T, H, D], [T, KV, D] -> [KV, D, D]``, one SVD per KV head."""
    _, num_heads, head_dim = queries.shape
    num_kv = keys.shape[1]
    group = num_heads // num_kv
    out = torch.zeros(num_kv, head_dim, head_dim, dtype=torch.float64)
    for g in range(num_kv):
        rows = [queries[:, h, :] for h in range(g * group, (g + 1) * group)]
        q_g = torch.cat(rows, dim=0).double()
        k_g = keys[:, g, :].double()
        _, sing, vh = torch.linalg.svd(q_g, full_matrices=True)
        columns = []
        for i in range(head_dim):
            v = vh[i, :]
            sigma = float(sing[i]) if i < sing.shape[0] else 0.0
            importance = sigma * float(torch.linalg.vector_norm(k_g @ v))
            columns.append((importance, i, v))
        columns.sort(key=lambda item: (-item[0], item[1]))
        for j, (_, _, v) in enumerate(columns):
            pivot = int(v.abs().argmax())
            sign = -1.0 if v[pivot] < 0 else 1.0
            out[g, :, j] = v * sign
    return out.float()


def ref_channels(
    queries: torch.Tensor,
    keys: torch.Tensor,
    skew: torch.Tensor,
    d_partial: int,
    use_keys: bool,
    spread_block: int = 0,
) -> torch.Tensor:
    """Top ``d_partial`` channels per KV head, ascending (ties: lower index).

    ``spread_block > 0``: the query's mean square times the keys' variance
    within consecutive blocks of that many tokens (a trailing partial block
    left out)."""
    _, num_heads, head_dim = queries.shape
    num_kv = keys.shape[1]
    group = num_heads // num_kv
    out = []
    for g in range(num_kv):
        a = skew[g].double()
        q_g = torch.cat(
            [queries[:, h, :] for h in range(g * group, (g + 1) * group)], dim=0
        ).double()
        scores = []
        for c in range(head_dim):
            q_col = (q_g @ a[:, c]).abs()
            if spread_block:
                k_col = keys[:, g, :].double() @ a[:, c]
                whole = max(1, len(k_col) // spread_block)
                width = min(spread_block, len(k_col))
                deviations = []
                for b in range(whole):
                    part = k_col[b * width : (b + 1) * width]
                    deviations += [float(v - part.mean()) ** 2 for v in part]
                spread = sum(deviations) / len(deviations)
                scores.append((float(q_col.pow(2).mean()) * spread, c))
            elif use_keys:
                k_col = (keys[:, g, :].double() @ a[:, c]).abs()
                scores.append((float(q_col.mean() * k_col.mean()), c))
            else:
                scores.append((float(q_col.sum()), c))
        scores.sort(key=lambda item: (-item[0], item[1]))
        out.append(sorted(c for _, c in scores[:d_partial]))
    return torch.tensor(out, dtype=torch.long)


def ref_speculate(
    x: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    skew: torch.Tensor,
    channels: torch.Tensor,
    num_heads: int,
    rope: RotaryFn | None,
    q_norm: HeadNormFn | None,
) -> torch.Tensor:
    """Per token, per head: full q, norm, RoPE, then ``q @ A[:, channels]``."""
    num_kv, head_dim, _ = skew.shape
    group = num_heads // num_kv
    d_partial = channels.shape[1]
    out = torch.zeros(x.shape[0], num_heads, d_partial, dtype=torch.float64)
    for t in range(x.shape[0]):
        full = q_weight.double() @ x[t].double()
        if q_bias is not None:
            full = full + q_bias.double()
        q = full.view(1, num_heads, head_dim).float()
        if q_norm is not None:
            q = q_norm(q)
        if rope is not None:
            q = rope(positions[t : t + 1], q)
        for h in range(num_heads):
            g = h // group
            for j in range(d_partial):
                column = skew[g, :, int(channels[g, j])].double()
                out[t, h, j] = float(q[0, h].double() @ column)
    return out


def ref_block_scores(
    query_partial: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    log_mass: bool = False,
) -> torch.Tensor:
    """Loops over requests, KV heads, blocks, tokens and query heads."""
    num_reqs, max_blocks = block_table.shape
    _, block_size, num_kv, _ = cache.shape
    group = query_partial.shape[1] // num_kv
    out = torch.full((num_reqs, num_kv, max_blocks), float("-inf"))
    for r in range(num_reqs):
        seq_len = int(seq_lens[r])

        def logit(h: int, t: int, g: int, r: int = r) -> float:
            key = cache[int(block_table[r, t // block_size]), t % block_size, g]
            return float(query_partial[r, h].double() @ key.double()) * scale

        for g in range(num_kv):
            heads = range(g * group, (g + 1) * group)
            if log_mass:
                probs = {}
                for h in heads:
                    row = [logit(h, t, g) for t in range(seq_len)]
                    top = max(row)
                    total = sum(math.exp(v - top) for v in row)
                    probs[h] = [math.exp(v - top) / total for v in row]
            for j in range(max_blocks):
                tokens = range(j * block_size, min((j + 1) * block_size, seq_len))
                if len(tokens) == 0:
                    continue
                if log_mass:
                    per_head = [sum(probs[h][t] for t in tokens) for h in heads]
                    mass = sum(per_head) / group
                    out[r, g, j] = math.log(mass) if mass > 0 else float("-inf")
                else:
                    out[r, g, j] = max(logit(h, t, g) for h in heads for t in tokens)
    return out


def ref_select(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    *,
    alpha: float,
    budget_fraction: float,
    max_blocks: int | None,
    sink: int,
    recent: int,
    reduction: str,
) -> tuple[list[list[int]], int]:
    """Selected logical blocks per request (ascending) and the output width."""
    num_reqs, num_kv, table_width = scores.shape
    width = table_width
    if max_blocks is not None:
        width = min(table_width, max(max_blocks, sink + recent))
    result = []
    for r in range(num_reqs):
        n = -(-int(seq_lens[r]) // block_size)
        forced = {j for j in range(n) if j < sink or j >= n - recent}
        margins = {}
        for j in range(n):
            if reduction == "per_head":
                best_margin = float("-inf")
                for g in range(num_kv):
                    head_best = max(float(scores[r, g, i]) for i in range(n))
                    best_margin = max(best_margin, float(scores[r, g, j]) - head_best)
                margins[j] = best_margin
            else:
                merged = []
                for i in range(n):
                    values = [float(scores[r, g, i]) for g in range(num_kv)]
                    if reduction == "max":
                        merged.append(max(values))
                    else:
                        top = max(values)
                        mean = sum(math.exp(v - top) for v in values) / num_kv
                        merged.append(top + math.log(mean))
                margins[j] = merged[j] - max(merged)
        candidates = [j for j in range(n) if j not in forced and margins[j] >= -alpha]
        budget = math.ceil(n * budget_fraction - 1e-6)
        if max_blocks is not None:
            budget = min(budget, max_blocks)
        room = max(budget - len(forced), 0)
        candidates.sort(key=lambda j: (-margins[j], -j))
        chosen = set(candidates[:room]) | forced
        result.append(sorted(chosen))
    return result, width


def ref_counts(
    num_blocks: int, block_table: torch.Tensor, selected: list[list[int]]
) -> torch.Tensor:
    """Selections per physical block."""
    counts = torch.zeros(num_blocks, dtype=torch.long)
    for r, blocks in enumerate(selected):
        for j in blocks:
            counts[int(block_table[r, j])] += 1
    return counts
