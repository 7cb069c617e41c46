"""UniAD's reconstruction transformer: encoder, decoder with learned queries, neighbour masks.

Tokens are sequence-first (``[H*W, B, C]``, the layout of ``nn.MultiheadAttention``'s default)
as in the authors' code, so the feature jitter draws its noise in their order. Attribute
names (``encoder.layers.N.self_attn``, ``decoder.layers.N.learned_embed``, ...) are ADer's, so
its state dicts load unchanged. Layers are post-norm with ReLU feed-forward blocks.

Attention runs with ``need_weights=True`` as in the authors' calls: PyTorch then computes it with
explicit matrix products (not the fused SDPA kernel), which gives their numbers to the last bit,
draws attention dropout from the RNG as they do on every device, and keeps the attention's
matrix products visible to FLOP counters (``FlopCounterMode`` misses the CPU SDPA kernel). At
UniAD's 256 tokens the weights it also returns cost little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def neighbour_half_widths(neighbor_size: Sequence[int]) -> tuple[int, int]:
    """Half-widths of the masked window: a query at ``(i, j)`` cannot see keys within
    ``size // 2`` rows and columns of it (ADer's rule: an even size masks ``size + 1`` cells)."""
    return int(neighbor_size[0]) // 2, int(neighbor_size[1]) // 2


def neighbour_mask_problem(feature_size: Sequence[int], neighbor_size: Sequence[int]) -> str | None:
    """Why ``neighbor_size`` does not fit a ``feature_size`` map, or None when it does.

    The mask must leave every query at least one key: a query sees nothing once its window
    covers all rows and all columns, i.e. when ``2 * (size // 2) >= side - 1`` on both axes.
    """
    if len(neighbor_size) != 2 or any(not isinstance(n, int) or n < 1 for n in neighbor_size):
        return f"neighbour size {list(neighbor_size)} is not two integers >= 1"
    (h, w), (rh, rw) = feature_size, neighbour_half_widths(neighbor_size)
    if 2 * rh >= h - 1 and 2 * rw >= w - 1:
        return (
            f"neighbour size {list(neighbor_size)} masks the whole {h}x{w} feature map for its central "
            f"queries (attention would see no key); use at most {max(h - 2, 1)} rows or {max(w - 2, 1)} "
            "columns"
        )
    return None


def neighbour_mask(feature_size: Sequence[int], neighbor_size: Sequence[int]) -> torch.Tensor:
    """Boolean attention mask ``[H*W, H*W]``: True where a query (row) must not attend to a key.

    Keys within the query's neighbourhood are hidden so that a token cannot copy itself or its
    neighbours (UniAD's neighbour-masked attention); borders clip the window.
    """
    problem = neighbour_mask_problem(feature_size, neighbor_size)
    if problem:
        raise ValueError(problem)
    h, w = feature_size
    rh, rw = neighbour_half_widths(neighbor_size)
    rows, cols = torch.arange(h), torch.arange(w)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= rh  # [h_query, h_key]
    near_cols = (cols[:, None] - cols[None, :]).abs() <= rw
    mask = near_rows[:, None, :, None] & near_cols[None, :, None, :]  # [hq, wq, hk, wk]
    return mask.reshape(h * w, h * w)


class LearnedPositionEmbedding(nn.Module):
    """Learned absolute positions: ``[column embedding, row embedding]`` per cell, ``[H*W, C]``."""

    def __init__(self, feature_size: Sequence[int], dim: int) -> None:
        super().__init__()
        self.feature_size = (int(feature_size[0]), int(feature_size[1]))
        self.row_embed = nn.Embedding(self.feature_size[0], dim // 2)
        self.col_embed = nn.Embedding(self.feature_size[1], dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        h, w = self.feature_size
        cols = self.col_embed.weight[None, :, :].expand(h, -1, -1)  # [H, W, C/2]
        rows = self.row_embed.weight[:, None, :].expand(-1, w, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)


class EncoderLayer(nn.Module):
    """Post-norm layer: masked self-attention (positions added to queries and keys), then an MLP."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qk = x + pos
        attended = self.self_attn(qk, qk, x, attn_mask=mask, need_weights=True)[0]
        x = self.norm1(x + self.dropout1(attended))
        hidden = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(hidden))


class DecoderLayer(nn.Module):
    """Post-norm layer whose queries are its own learned embedding (one per feature cell).

    As in the authors' code, every layer starts again from ``learned_embed``: the first attention
    reads the encoder output (``memory``), the second the previous layer's output (``prev``;
    the encoder output for the first layer). Both use positions on queries and keys.
    """

    def __init__(self, num_queries: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        prev: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        mask_memory: torch.Tensor | None,
        mask_prev: torch.Tensor | None,
    ) -> torch.Tensor:
        queries = self.learned_embed.weight[:, None, :].expand(-1, memory.shape[1], -1)
        attended = self.self_attn(
            queries + pos, memory + pos, memory, attn_mask=mask_memory, need_weights=True
        )[0]
        x = self.norm1(queries + self.dropout1(attended))
        attended = self.multihead_attn(x + pos, prev + pos, prev, attn_mask=mask_prev, need_weights=True)[0]
        x = self.norm2(x + self.dropout2(attended))
        hidden = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm3(x + self.dropout3(hidden))


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` (no final norm, as post-norm UniAD has none)."""

    def __init__(self, layers: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, mask)
        return x


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer` followed by a LayerNorm."""

    def __init__(
        self, layers: int, num_queries: int, dim: int, heads: int, ffn_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(num_queries, dim, heads, ffn_dim, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        memory: torch.Tensor,
        pos: torch.Tensor,
        mask_memory: torch.Tensor | None,
        mask_prev: torch.Tensor | None,
    ) -> torch.Tensor:
        x = memory
        for layer in self.layers:
            x = layer(x, memory, pos, mask_memory, mask_prev)
        return self.norm(x)


class ReconstructionTransformer(nn.Module):
    """Encoder + decoder over ``[H*W, B, C]`` tokens with UniAD's neighbour masks.

    ``neighbor_mask`` says which attentions are masked: (encoder, decoder's first, decoder's
    second); ``neighbor_size`` None masks none. The mask is a non-persistent buffer (rebuilt
    from the configuration, not stored in checkpoints, as the authors' was not a parameter).
    """

    def __init__(
        self,
        feature_size: Sequence[int],
        dim: int,
        heads: int,
        encoder_layers: int,
        decoder_layers: int,
        ffn_dim: int,
        dropout: float,
        neighbor_size: Sequence[int] | None,
        neighbor_mask: Sequence[bool] = (True, True, True),
    ) -> None:
        super().__init__()
        if len(neighbor_mask) != 3:
            raise ValueError(f"neighbor_mask needs 3 flags (encoder, decoder 1, 2), got {neighbor_mask}")
        num_queries = int(feature_size[0]) * int(feature_size[1])
        self.encoder = Encoder(encoder_layers, dim, heads, ffn_dim, dropout)
        self.decoder = Decoder(decoder_layers, num_queries, dim, heads, ffn_dim, dropout)
        mask = None if neighbor_size is None else neighbour_mask(feature_size, neighbor_size)
        self.register_buffer("mask", mask, persistent=False)
        self.use_mask = tuple(bool(m) for m in neighbor_mask)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Reconstructed tokens ``[H*W, B, C]`` from input tokens and positions ``[H*W, C]``."""
        pos = pos[:, None, :]
        enc, dec1, dec2 = (self.mask if on else None for on in self.use_mask)
        memory = self.encoder(tokens, pos, enc)
        return self.decoder(memory, pos, dec1, dec2)
