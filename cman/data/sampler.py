"""Speaker-balanced training order: every batch holds (nearly) the same number of items from each speaker.

With speakers of unequal size, a uniformly shuffled batch is dominated by the largest speakers and the model learns
their voices; here each speaker contributes in turn (speaker order reshuffled every round), and a speaker whose
items run out starts a fresh shuffle of its own items, so an epoch still has one index per dataset item.
Items without a speaker are one extra "speaker" of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class SpeakerBalancedSampler(Sampler[int]):
    """Indices of `speakers` (one entry per item, None allowed) in speaker-round-robin order.

    `generator` is shared with the DataLoader, which training reseeds every epoch: the order depends only on the
    seed and the epoch.
    """

    def __init__(self, speakers: Sequence[str | None], generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self.groups: dict[str | None, list[int]] = {}
        for index, speaker in enumerate(speakers):
            self.groups.setdefault(speaker, []).append(index)
        self.total = len(speakers)

    def __len__(self) -> int:
        return self.total

    def _shuffled(self, indices: list[int]) -> list[int]:
        return [indices[i] for i in torch.randperm(len(indices), generator=self.generator).tolist()]

    def __iter__(self) -> Iterator[int]:
        names = list(self.groups)
        queues = {name: self._shuffled(self.groups[name]) for name in names}
        emitted = 0
        while emitted < self.total:
            for pick in torch.randperm(len(names), generator=self.generator).tolist():
                name = names[pick]
                if not queues[name]:
                    queues[name] = self._shuffled(self.groups[name])
                yield queues[name].pop()
                emitted += 1
                if emitted == self.total:
                    return


def speaker_sampler(items: Sequence, generator: torch.Generator | None = None) -> SpeakerBalancedSampler | None:
    """A balanced sampler when at least two of `items` name different speakers, else None (plain shuffling)."""
    speakers = [getattr(item, "speaker", None) for item in items]
    if len({s for s in speakers if s is not None}) < 2:
        return None
    return SpeakerBalancedSampler(speakers, generator)


__all__ = ["SpeakerBalancedSampler", "speaker_sampler"]
