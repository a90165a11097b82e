"""Losses: hand-computed max-margin values, InfoNCE vs a manual loop, CMANLoss pairing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cman.losses import CMANLoss, InfoNCELoss, MaxMarginLoss
from cman.modality import Modality

# a = [1,0], [.6,.8], [0,1];  b = [.8,.6], [0,1], [.6,.8]  (all unit length)
# S = a @ b.T = [[.8,  0, .6],
#                [.96, .8, 1.0],
#                [.6,  1, .8]]      diagonal .8 everywhere
# margin .5: cost[i, j] = relu(.5 + S[i, j] - .8) (same for both directions since the diagonal is constant)
#   (0,1) 0   (0,2) .3   (1,0) .66   (1,2) .7   (2,0) .3   (2,1) .7
A = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
B = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
GROUPED = torch.tensor([0, 1, 1])  # items 1 and 2 share a group: (1,2), (2,1) are not negatives
UNGROUPED = torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    ("mode", "groups", "expected"),
    [
        # grouped, hardest: rows (anchor a_i) .3 + .66 + .3; columns (anchor b_j) max(.66,.3) + 0 + .3
        #   = (1.26 + .96) / 3
        ("hardest", GROUPED, (1.26 + 0.96) / 3),
        # grouped, sum: rows .3 + .66 + .3; columns (.66 + .3) + 0 + .3 = (1.26 + 1.26) / 3
        ("sum", GROUPED, (1.26 + 1.26) / 3),
        # ungrouped, hardest: rows .3 + max(.66,.7) + max(.3,.7) = 1.7;
        #   columns max(.66,.3) + max(0,.7) + max(.3,.7) = 2.06
        ("hardest", UNGROUPED, (1.7 + 2.06) / 3),
        # ungrouped, sum: rows .3 + 1.36 + 1.0 = 2.66; columns .96 + .7 + 1.0 = 2.66
        ("sum", UNGROUPED, (2.66 + 2.66) / 3),
    ],
)
def test_max_margin_hand_computed(mode: str, groups: torch.Tensor, expected: float) -> None:
    loss = MaxMarginLoss(margin=0.5, mode=mode)(A, B, groups)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_group_masking_changes_max_margin() -> None:
    for mode in ("hardest", "sum"):
        loss_fn = MaxMarginLoss(margin=0.5, mode=mode)
        grouped, ungrouped = loss_fn(A, B, GROUPED), loss_fn(A, B, UNGROUPED)
        assert grouped.item() < ungrouped.item() - 0.1
        assert loss_fn(A, B).item() == pytest.approx(ungrouped.item())  # default groups


def test_max_margin_zero_when_all_one_group() -> None:
    assert MaxMarginLoss(0.5, "hardest")(A, B, torch.zeros(3, dtype=torch.long)) == 0


def _manual_infonce(a: torch.Tensor, b: torch.Tensor, groups: list[int], t: float) -> float:
    s = (a @ b.T).tolist()
    n = len(groups)

    def ce(rows: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            # denominator: the positive plus every item of another group
            denom = sum(math.exp(rows[i][j] / t) for j in range(n) if j == i or groups[j] != groups[i])
            total += -math.log(math.exp(rows[i][i] / t) / denom)
        return total / n

    s_t = [[s[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (ce(s) + ce(s_t))


@pytest.mark.parametrize("groups", [[0, 1, 1], [0, 1, 2]])
def test_infonce_matches_manual(groups: list[int]) -> None:
    loss = InfoNCELoss(temperature=0.5)(A, B, torch.tensor(groups))
    assert loss.item() == pytest.approx(_manual_infonce(A, B, groups, 0.5), rel=1e-5)


def test_infonce_ungrouped_is_clip_loss() -> None:
    logits = A @ B.T / 0.1
    target = torch.arange(3)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert InfoNCELoss(0.1)(A, B).item() == pytest.approx(clip.item(), rel=1e-5)


def test_infonce_learnable_temperature_gets_gradient() -> None:
    loss_fn = InfoNCELoss(temperature=0.07, learnable=True)
    assert loss_fn.temperature == pytest.approx(0.07)
    loss_fn(A, B, GROUPED).backward()
    assert loss_fn.log_scale.grad is not None
    assert "log_scale" not in dict(InfoNCELoss(0.07).named_parameters())


def _batch() -> tuple[dict[Modality, torch.Tensor], dict[Modality, torch.Tensor]]:
    torch.manual_seed(0)
    emb = {m: F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True) for m in Modality}
    present = {
        Modality.TEXT: torch.tensor([True, True, True, False]),
        Modality.AUDIO: torch.tensor([False, True, True, True]),
        Modality.IMAGE: torch.ones(4, dtype=torch.bool),
    }
    return emb, present


def test_cman_loss_uses_rows_where_both_present() -> None:
    emb, present = _batch()
    groups = torch.tensor([0, 1, 2, 3])
    loss_fn = CMANLoss(kind="max_margin", margin=0.2, mode="hardest", temperature=0.07)
    out = loss_fn(emb, present, groups)
    pair = MaxMarginLoss(0.2, "hardest")
    t, a, i = emb[Modality.TEXT], emb[Modality.AUDIO], emb[Modality.IMAGE]
    ti = pair(t[:3], i[:3], groups[:3])  # text rows 0-2
    ai = pair(a[1:], i[1:], groups[1:])  # audio rows 1-3
    ta = pair(t[1:3], a[1:3], groups[1:3])  # both: rows 1-2
    assert out["text-image"].item() == pytest.approx(ti.item())
    assert out["audio-image"].item() == pytest.approx(ai.item())
    assert out["text-audio"].item() == pytest.approx(ta.item())
    assert out["loss"].item() == pytest.approx((ti + ai + ta).item() / 3)
    assert out["margin_loss"] is out["loss"]


def test_cman_loss_gradient_flows_only_to_used_rows() -> None:
    emb, present = _batch()
    out = CMANLoss("infonce", 0.2, "hardest", 0.1)(emb, present, torch.arange(4))
    assert set(out) == {
        "loss",
        "infonce_loss",
        "text-image",
        "audio-image",
        "text-audio",
    }
    out["loss"].backward()
    text_grad = emb[Modality.TEXT].grad
    assert text_grad is not None
    assert text_grad[:3].abs().sum() > 0
    assert text_grad[3].abs().sum() == 0  # text absent in row 3
    assert emb[Modality.AUDIO].grad[0].abs().sum() == 0  # audio absent in row 0


def test_cman_loss_skips_pairs_with_fewer_than_two_rows() -> None:
    emb, present = _batch()
    present[Modality.AUDIO] = torch.tensor([False, False, False, True])
    out = CMANLoss("max_margin", 0.2, "sum", 0.07)(emb, present, torch.arange(4))
    assert set(out) == {"loss", "margin_loss", "text-image"}
    assert out["loss"].item() == pytest.approx(out["text-image"].item())


def test_cman_loss_missing_modality_and_no_pairs() -> None:
    emb, present = _batch()
    only_text = {Modality.TEXT: emb[Modality.TEXT]}
    out = CMANLoss("max_margin", 0.2, "hardest", 0.07)(only_text, present, torch.arange(4))
    assert set(out) == {"loss", "margin_loss"}
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # graph-connected zero: backward works
    assert emb[Modality.TEXT].grad is not None


def test_from_config_and_validation() -> None:
    cfg = SimpleNamespace(type="max_margin", margin=0.3, mode="sum", temperature=0.05)
    loss_fn = CMANLoss.from_config(cfg)
    assert isinstance(loss_fn.pair_loss, MaxMarginLoss)
    assert loss_fn.pair_loss.margin == 0.3 and loss_fn.pair_loss.mode == "sum"
    cfg.type = "infonce"
    assert isinstance(CMANLoss.from_config(cfg).pair_loss, InfoNCELoss)
    with pytest.raises(ValueError, match="loss type"):
        CMANLoss(kind="triplet")
    with pytest.raises(ValueError, match="mode"):
        MaxMarginLoss(0.2, mode="mean")
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)
    with pytest.raises(ValueError, match="equal shape"):
        MaxMarginLoss()(A, B[:2])


def test_summed_hinges_warm_up_then_the_hardest_negative() -> None:
    """`loss.hardest_from_epoch`: mode sum before that epoch, hardest from it (and again after a resume)."""
    from cman.config import ConfigError, LossConfig

    loss = CMANLoss.from_config(LossConfig(mode="sum", hardest_from_epoch=3))
    seen = []
    for epoch in (1, 2, 3, 4, 2):  # the last: a resumed run that restarts at epoch 2
        loss.set_epoch(epoch)
        seen.append(loss.pair_loss.mode)
    assert seen == ["sum", "sum", "hardest", "hardest", "sum"]
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    embeddings, present, groups = {Modality.TEXT: a, Modality.IMAGE: b}, {}, torch.arange(6)
    loss.set_epoch(1)
    summed = loss(embeddings, present, groups)["loss"]
    loss.set_epoch(3)
    hardest = loss(embeddings, present, groups)["loss"]
    assert summed > hardest > 0  # the sum over all negatives bounds the hardest one from above
    with pytest.raises((ConfigError, ValueError), match="hardest_from_epoch"):
        LossConfig(mode="hardest", hardest_from_epoch=3)
