"""Contrastive losses over per-modality embeddings.

All losses are group-aware: items of the same relevance group (the 5 captions of one image, one digit class) are
never used as each other's negatives.

- :class:`MaxMarginLoss`: bidirectional hinge with hard negatives (VSE++, Faghri et al. 2018).
- :class:`InfoNCELoss`: symmetric CLIP-style cross-entropy.
- :class:`CMANLoss`: applies one of them to every modality pair present in a batch and returns named terms.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cman.config import LossKind, MarginMode
from cman.modality import Modality

PAIRS: tuple[tuple[Modality, Modality], ...] = (
    (Modality.TEXT, Modality.IMAGE),
    (Modality.AUDIO, Modality.IMAGE),
    (Modality.TEXT, Modality.AUDIO),
)
LOSS_KINDS = get_args(LossKind)  # the allowed values are written once, in cman.config
MARGIN_MODES = get_args(MarginMode)


def _pair_name(pair: tuple[Modality, Modality]) -> str:
    return f"{pair[0].value}-{pair[1].value}"


def _check_pair_inputs(a: Tensor, b: Tensor, groups: Tensor | None) -> Tensor:
    """Validate shapes; return groups (default: every row its own group). # (batch,)"""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"pair loss needs a and b of equal shape (batch, dim), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if groups is None:
        return torch.arange(a.shape[0], device=a.device)
    if groups.shape != (a.shape[0],):
        raise ValueError(f"groups must have shape ({a.shape[0]},), got {tuple(groups.shape)}")
    return groups.to(a.device)


class MaxMarginLoss(nn.Module):
    """Bidirectional max-margin (hinge) loss, VSE++.

    With ``S = a @ b.T`` and positives on the diagonal, a negative of anchor ``a_i`` is any ``b_j`` with
    ``groups[j] != groups[i]`` (same-group pairs, diagonal or not, are never negatives)::

        cost_ab[i, j] = relu(margin + S[i, j] - S[i, i])   # anchor a_i, wrong b_j
        cost_ba[i, j] = relu(margin + S[i, j] - S[j, j])   # anchor b_j, wrong a_i

    ``mode="hardest"`` takes per anchor the max over its negatives (0 if it has none); ``mode="sum"`` sums them.
    The result is ``(sum_i cost_a_i + sum_j cost_b_j) / batch``: both directions summed, averaged over anchors.
    """

    def __init__(self, margin: float = 0.2, mode: str = "hardest") -> None:
        super().__init__()
        if mode not in MARGIN_MODES:
            raise ValueError(f"MaxMarginLoss mode must be one of {MARGIN_MODES}, got {mode!r}")
        if margin < 0:
            raise ValueError(f"MaxMarginLoss margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.mode = mode

    def forward(self, a: Tensor, b: Tensor, groups: Tensor | None = None) -> Tensor:
        """a, b: # (batch, dim) L2-normalised; groups: # (batch,) long. Returns a scalar."""
        groups = _check_pair_inputs(a, b, groups)
        scores = a @ b.T  # (batch, batch)
        positives = scores.diagonal()  # (batch,)
        negative = groups[:, None] != groups[None, :]  # (batch, batch)
        # anchor a_i (rows) against wrong b_j; anchor b_j (columns) against wrong a_i
        cost_ab = (self.margin + scores - positives[:, None]).clamp(min=0)  # (batch, batch)
        cost_ba = (self.margin + scores - positives[None, :]).clamp(min=0)  # (batch, batch)
        cost_ab, cost_ba = cost_ab * negative, cost_ba * negative
        if self.mode == "hardest":
            cost_a, cost_b = cost_ab.amax(dim=1), cost_ba.amax(dim=0)  # (batch,) each
        else:
            cost_a, cost_b = cost_ab.sum(dim=1), cost_ba.sum(dim=0)  # (batch,) each
        per_anchor = cost_a + cost_b  # (batch,)
        return per_anchor.sum() / a.shape[0]


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over ``logits = a @ b.T / temperature``.

    Row ``i`` is classified against target ``i`` (a->b) and column ``j`` against ``j`` (b->a); the result is the
    mean of the two cross-entropies. Off-diagonal items of the anchor's own group are set to ``-inf`` so they are
    neither positives nor negatives. With ``learnable=True`` the inverse temperature is a parameter (stored as its
    log, clamped at 100 like CLIP).
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCELoss temperature must be > 0, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.log_scale.detach().exp().clamp(max=100.0))

    def forward(self, a: Tensor, b: Tensor, groups: Tensor | None = None) -> Tensor:
        """a, b: # (batch, dim) L2-normalised; groups: # (batch,) long. Returns a scalar."""
        groups = _check_pair_inputs(a, b, groups)
        batch = a.shape[0]
        eye = torch.eye(batch, dtype=torch.bool, device=a.device)  # (batch, batch)
        same_group = (groups[:, None] == groups[None, :]) & ~eye  # (batch, batch)
        logits = (a @ b.T) * self.log_scale.exp().clamp(max=100.0)  # (batch, batch)
        logits = logits.masked_fill(same_group, float("-inf"))
        targets = torch.arange(batch, device=a.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class CMANLoss(nn.Module):
    """Pair loss over every modality pair present in a batch.

    Pairs are (text, image), (audio, image), (text, audio), the first being ``a``. Each pair is computed over the
    rows where both modalities are present and skipped with fewer than 2 such rows. Returns
    ``{"loss", "margin_loss" | "infonce_loss", "text-image"?, "audio-image"?, "text-audio"?}`` where ``loss`` (and its
    named alias) is the mean over the pairs computed, and a graph-connected zero when none is.
    """

    def __init__(
        self,
        kind: str = "max_margin",
        margin: float = 0.2,
        mode: str = "hardest",
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        hardest_from_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if kind == "max_margin":
            self.pair_loss: nn.Module = MaxMarginLoss(margin=margin, mode=mode)
            self.term_name = "margin_loss"
        elif kind == "infonce":
            self.pair_loss = InfoNCELoss(temperature=temperature, learnable=learnable_temperature)
            self.term_name = "infonce_loss"
        else:
            raise ValueError(f"loss type must be one of {LOSS_KINDS}, got {kind!r}")
        self.kind = kind
        self.hardest_from_epoch = hardest_from_epoch  # max_margin + sum: hardest negatives from then (set_epoch)

    @classmethod
    def from_config(cls, cfg: Any) -> CMANLoss:
        """Build from a `LossConfig` (`type`, `margin`, `mode`, `temperature`, `hardest_from_epoch`)."""
        return cls(
            kind=cfg.type,
            margin=cfg.margin,
            mode=cfg.mode,
            temperature=cfg.temperature,
            hardest_from_epoch=getattr(cfg, "hardest_from_epoch", None),  # any object with LossConfig's fields
        )

    def set_epoch(self, epoch: int) -> None:
        """Before epoch `epoch` (1-based): summed hinges until `hardest_from_epoch`, the hardest negative from it."""
        if self.hardest_from_epoch is not None and isinstance(self.pair_loss, MaxMarginLoss):
            self.pair_loss.mode = "hardest" if epoch >= self.hardest_from_epoch else "sum"

    def forward(
        self,
        embeddings: dict[Modality, Tensor],
        present: dict[Modality, Tensor],
        groups: Tensor,
    ) -> dict[str, Tensor]:
        """embeddings: modality -> # (batch, dim); present: modality -> # (batch,) bool (missing key: all rows
        present); groups: # (batch,) long."""
        terms: dict[str, Tensor] = {}
        for pair in PAIRS:
            a_mod, b_mod = pair
            if a_mod not in embeddings or b_mod not in embeddings:
                continue
            a, b = embeddings[a_mod], embeddings[b_mod]
            rows = _mask(present, a_mod, a) & _mask(present, b_mod, b)  # (batch,), on the masks' device
            count = int(rows.sum())  # host-side when the masks come from the loader (CPU): no device sync
            if count < 2:
                continue
            if count == rows.numel():  # every row has both: no boolean indexing (it would sync on a GPU)
                terms[_pair_name(pair)] = self.pair_loss(a, b, groups.to(a.device))
                continue
            index = rows.nonzero().squeeze(1).to(a.device)  # (rows,)
            terms[_pair_name(pair)] = self.pair_loss(a[index], b[index], groups.to(a.device)[index])
        if terms:
            loss = torch.stack(list(terms.values())).mean()
        elif embeddings:
            loss = sum(e.sum() * 0.0 for e in embeddings.values())
        else:
            loss = torch.zeros(())
        return {"loss": loss, self.term_name: loss, **terms}


def _mask(present: dict[Modality, Tensor], modality: Modality, emb: Tensor) -> Tensor:
    """Rows of ``emb`` where ``modality`` is present (all rows if ``present`` lacks it). # (batch,)"""
    mask = present.get(modality)
    if mask is None:
        return torch.ones(emb.shape[0], dtype=torch.bool)
    return mask.to(dtype=torch.bool).cpu()
