"""Training orders: speaker-balanced batches, and batches of neighbouring groups (hard negatives by attribute).

Speaker-balanced: every batch holds (nearly) the same number of items from each speaker.

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


class NeighbourGroupSampler(Sampler[int]):
    """Indices in batches of neighbouring groups: each batch is built around anchor groups, each followed by one item
    of every group that differs from it in exactly one attribute (groups are attribute values joined by
    `separator`, e.g. ``small-blue-square-right``), in random order, until the batch is full.

    Why: with uniformly shuffled batches an item rarely meets the items that differ from it in one attribute only
    (of the demo's 96 groups, 3 differ from a group in shape alone: in a batch of 32, ~1 such item), so a margin loss
    learns the easy attributes and leaves the hard one (measured: shape is wrong in every wrong top-1 result of the
    demo, see configs/demo.yaml). An epoch still has one index per item; a group whose items run out starts a fresh
    shuffle of its own. Consecutive runs of `batch_size` indices are the batches: use it with a DataLoader of the
    same batch size, no shuffling. `generator` is the DataLoader's, reseeded every epoch.
    """

    def __init__(
        self, groups: Sequence[str], batch_size: int, separator: str = "-", generator: torch.Generator | None = None
    ) -> None:
        self.generator = generator
        self.batch_size = batch_size
        self.total = len(groups)
        self.members: dict[str, list[int]] = {}
        for index, group in enumerate(groups):
            self.members.setdefault(group, []).append(index)
        self.names = list(self.members)
        self.neighbours = _one_attribute_neighbours(self.names, separator)

    def __len__(self) -> int:
        return self.total

    def _perm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def __iter__(self) -> Iterator[int]:
        queues: dict[str, list[int]] = {}

        def take(group: str) -> int:
            if not queues.get(group):
                items = self.members[group]
                queues[group] = [items[i] for i in self._perm(len(items))]
            return queues[group].pop()

        emitted = 0
        while emitted < self.total:
            batch: list[int] = []
            used: set[str] = set()
            for anchor in (self.names[i] for i in self._perm(len(self.names))):
                if len(batch) >= self.batch_size:
                    break
                if anchor in used:
                    continue
                near = self.neighbours[anchor]
                for group in [anchor, *(near[i] for i in self._perm(len(near)))]:
                    if len(batch) < self.batch_size and group not in used:
                        used.add(group)
                        batch.append(take(group))
            yield from batch[: self.total - emitted]
            emitted += len(batch)


def _one_attribute_neighbours(names: list[str], separator: str) -> dict[str, list[str]]:
    """group -> the groups whose attribute tuples differ from it in exactly one place (same number of attributes, at
    least two: a group name without a separator has no attributes to vary)."""
    parts = {name: name.split(separator) for name in names}
    parts = {name: values for name, values in parts.items() if len(values) > 1}
    by_key: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for name, values in parts.items():  # groups sharing all attributes but one share a key with that one left out
        for k in range(len(values)):
            by_key.setdefault((k, (str(len(values)), *values[:k], *values[k + 1 :])), []).append(name)
    near: dict[str, list[str]] = {name: [] for name in names}
    for members in by_key.values():
        for name in members:
            near[name].extend(other for other in members if other != name)
    return near


def neighbour_sampler(
    items: Sequence, batch_size: int, generator: torch.Generator | None = None
) -> NeighbourGroupSampler | None:
    """A NeighbourGroupSampler when some groups of `items` differ in one attribute only, else None (plain shuffling)."""
    sampler = NeighbourGroupSampler([item.group for item in items], batch_size, generator=generator)
    return sampler if any(sampler.neighbours.values()) else None


__all__ = ["NeighbourGroupSampler", "SpeakerBalancedSampler", "neighbour_sampler", "speaker_sampler"]
