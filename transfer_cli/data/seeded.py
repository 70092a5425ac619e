"""A dataset whose random transforms draw from a seed fixed by the item's position, not by RNG history.

Worker processes draw crops and flips from RNGs seeded once per worker start (or from the main process's RNG
with num_workers=0), so their state after k epochs is history, which a resumed run cannot replay. Here item i
is transformed under torch's RNG seeded from (seed, *position, i) and restored afterwards, whichever process or
worker loads it: the training image of epoch e (keys (e, i) from samplers.ResumableSampler), or the cached
augmented view k of an image (a fixed prefix (k,)).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from transfer_cli import seeding


class SeededItems(Dataset):
    """`dataset[i]` under `seeding.torch_seeded(derived_seed(seed, *prefix, *key, stream))`.

    A key is an index, or an (epoch, index) pair; the index alone picks the item.
    """

    def __init__(self, dataset: Any, seed: int, stream: int, prefix: Sequence[int] = ()):
        self.dataset = dataset
        self.seed = int(seed)
        self.stream = int(stream)
        self.prefix = tuple(int(p) for p in prefix)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        position = tuple(int(k) for k in key) if isinstance(key, (tuple, list)) else (int(key),)
        if not self.prefix and len(position) == 1:  # an index without its epoch, e.g. from code iterating it
            position = (0, *position)
        with seeding.torch_seeded(seeding.derived_seed(self.seed, *self.prefix, *position, stream=self.stream)):
            return self.dataset[position[-1]]


__all__ = ["SeededItems"]
