"""The contract between the engine and a dataset.

A data module is built from the data config's ``module`` node and hands the
engine iterables of batches (tensors, or tuples/dicts of tensors on the CPU;
the engine moves them to the device). Training order depends only on the
run's seed and the epoch, so a run resumed at an epoch boundary sees exactly
the batches an uninterrupted run would have seen.

A run on several processes (xgrad/distributed.py) keeps the batches global:
each rank calls :meth:`DataModule.shard` once, after which its training
batches are its own share of the very batches one process would draw, so the
ranks together train on exactly what one process trains on. Evaluation splits
are not shared: every rank evaluates them whole.

Every dataset has three disjoint splits: training, validation (which picks
the epoch a run is judged at) and test (what the tables report at that
epoch), so the test set never chooses anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class DataModule(Protocol):
    #: what was actually read, for summary.json and the tables (e.g. ``mnist`` or the 5,000-digit subset)
    variant: str

    def sizes(self) -> dict[str, Any]:
        """``{"train": n, "val": n, "test": n | None, "unit": "images" | "tokens" | ...}``: the splits' sizes."""

    def train_batches(self, epoch: int, seed: int) -> Iterable[Any]:
        """One epoch of training batches, shuffled by a generator seeded from (seed, epoch)."""

    def val_batches(self) -> Iterable[Any]:
        """The validation split, in a fixed order."""

    def test_batches(self) -> Iterable[Any]:
        """The test split, in a fixed order: evaluated every epoch, reported at the epoch validation selects."""

    def num_train_batches(self) -> int:
        """Batches in one training epoch (for progress bars and schedulers)."""

    def shard(self, rank: int, world_size: int) -> None:
        """From now on, hand out rank ``rank``'s share (of ``world_size`` disjoint ones) of every training batch.

        Every rank must get a share of every batch (DDP steps them together):
        an epoch's last batch, when it holds fewer samples than there are
        ranks, is left out on every rank.
        """


class DatasetMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched here.

    The message says where the loader looked and the one command that fetches it.
    """

    def __init__(self, name: str, looked_in: str, fetch_command: str = ""):
        fetch = fetch_command or f"python scripts/prepare_data.py {name} --root <data.root>"
        super().__init__(f"dataset '{name}' not found in {looked_in}; fetch it with: {fetch}")
        self.name, self.looked_in, self.fetch_command = name, looked_in, fetch
