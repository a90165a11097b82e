"""The shared fusion transformer: any non-empty set of modality token sequences → one L2-normalised embedding."""

from __future__ import annotations

import torch
from torch import nn

from cman.config import FusionConfig
from cman.modality import ALL_MODALITIES, Modality


class FusionTransformer(nn.Module):
    """Concatenate [CLS] + tokens of each present modality (+ a modality-type embedding), encode, pool, project."""

    def __init__(self, cfg: FusionConfig, embedding_dim: int, dropout: float) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.type_embedding = nn.Embedding(len(ALL_MODALITIES), cfg.width)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.width,
            nhead=cfg.heads,
            dim_feedforward=cfg.ffn,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.width, embedding_dim)
        self.pool = cfg.pool
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.type_embedding.weight, std=0.02)

    def forward(self, streams: dict[Modality, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """streams: modality → (tokens (batch, seq, width), mask (batch, seq)). Returns (batch, embedding_dim)."""
        if not streams:
            raise ValueError("fusion needs at least one modality")
        tokens, masks = [], []
        for modality, (tok, mask) in streams.items():
            type_id = ALL_MODALITIES.index(Modality(modality))
            tokens.append(tok + self.type_embedding.weight[type_id])
            masks.append(mask)
        batch = tokens[0].shape[0]
        x = torch.cat([self.cls.expand(batch, -1, -1).to(tokens[0].dtype), *tokens], dim=1)  # (batch, 1+seq, width)
        valid = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=x.device), *masks], dim=1)
        x = self.norm(self.encoder(x, src_key_padding_mask=~valid))  # (batch, 1+seq, width)
        if self.pool == "cls":
            pooled = x[:, 0]  # (batch, width)
        else:
            w = valid.to(x.dtype)[..., None]
            pooled = (x * w).sum(1) / w.sum(1)
        emb = self.head(self.dropout(pooled))  # (batch, embedding_dim)
        return nn.functional.normalize(emb.float(), dim=-1)
