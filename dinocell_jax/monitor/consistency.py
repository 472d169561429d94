"""Channel consistency: do single-channel views of a field embed alike?

The guide's `consistency/chI_vs_chJ` (1-based, all 10 pairs of the 5 stains) and
`consistency/average` (target > 0.85: channel-invariant features). Raw cosines
are inflated by the common direction every embedding shares early in training,
so two stricter views ride along: `average_centered` (cosines after removing the
mean embedding) and `retrieval_top1` (does a field's channel-i embedding find the
same field among all channel-j embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = 1e-8


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _pair_cosines(u: np.ndarray) -> dict[tuple[int, int], float]:
    n_channels = u.shape[1]
    return {
        (i, j): float(np.mean(np.sum(u[:, i] * u[:, j], axis=-1)))
        for i in range(n_channels)
        for j in range(i + 1, n_channels)
    }


def channel_consistency(
    channel_emb: np.ndarray, mean_emb: np.ndarray, channel_names: Sequence[str]
) -> dict[str, float]:
    """Consistency metrics of per-channel embeddings of the same fields.

    Args:
      channel_emb: `[P, C, D]` float, the embedding of each field seen through each
        single channel (C >= 2, in `channel_names` order).
      mean_emb: `[P, D]` float, the embedding of each field's channel mean.
      channel_names: the C stain names (checked against C; keys use 1-based numbers,
        the guide's names).

    Returns:
      `consistency/ch{i}_vs_ch{j}` (i < j): mean over fields of the cosine between
      the two channels' embeddings of the same field; `consistency/ch{i}_vs_mean`;
      `consistency/average` (mean over the pairs); `consistency/average_centered`
      (the same after subtracting the mean embedding over all fields and channels);
      `consistency/retrieval_top1`: fraction of (field, ordered pair i != j) whose
      channel-i embedding has the same field's channel-j embedding as its cosine
      nearest neighbour among all P channel-j embeddings (chance 1/P). Floats.
    """
    channel_emb = np.asarray(channel_emb, np.float64)
    mean_emb = np.asarray(mean_emb, np.float64)
    if channel_emb.ndim != 3:
        raise ValueError(f"channel_consistency: channel_emb must be [P, C, D], got shape {channel_emb.shape}")
    n_fields, n_channels, dim = channel_emb.shape
    if n_channels < 2:
        raise ValueError(f"channel_consistency: need at least 2 channels, channel_emb has shape {channel_emb.shape}")
    if mean_emb.shape != (n_fields, dim):
        raise ValueError(f"channel_consistency: mean_emb must be [{n_fields}, {dim}], got shape {mean_emb.shape}")
    if len(channel_names) != n_channels:
        raise ValueError(
            f"channel_consistency: {len(channel_names)} channel_names {list(channel_names)} for {n_channels} channels"
        )

    u = _unit(channel_emb)
    out: dict[str, float] = {}
    pairs = _pair_cosines(u)
    for (i, j), value in pairs.items():
        out[f"consistency/ch{i + 1}_vs_ch{j + 1}"] = value
    m = _unit(mean_emb)
    for i in range(n_channels):
        out[f"consistency/ch{i + 1}_vs_mean"] = float(np.mean(np.sum(u[:, i] * m, axis=-1)))
    out["consistency/average"] = float(np.mean(list(pairs.values())))

    centered = _unit(channel_emb - channel_emb.mean(axis=(0, 1)))
    out["consistency/average_centered"] = float(np.mean(list(_pair_cosines(centered).values())))

    hits = []
    for i in range(n_channels):
        for j in range(n_channels):
            if i != j:
                nearest = np.argmax(u[:, i] @ u[:, j].T, axis=1)
                hits.append(nearest == np.arange(n_fields))
    out["consistency/retrieval_top1"] = float(np.mean(hits))
    return out
