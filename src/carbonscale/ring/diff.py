"""What a member change moves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from carbonscale.ring.placement import Ring


@dataclass
class RingDiff:
    """Running totals of old -> new placement over batches of names.

    A metric moves when its set of owners changes (a new replica order alone
    moves no data). `matrix` counts names by (old primary, new primary).
    """

    old: Ring
    new: Ring
    total: int = 0
    moved: int = 0
    matrix: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, names: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Account a batch; return (indices of moved names, old rows, new rows)."""
        old_rows, new_rows = self.old.locate_batch(names), self.new.locate_batch(names)
        pairs = np.stack([old_rows[:, 0], new_rows[:, 0]], axis=1)
        keys, counts = np.unique(pairs, axis=0, return_counts=True)
        for (src, dst), count in zip(keys.tolist(), counts.tolist(), strict=True):
            self.matrix[(src, dst)] = self.matrix.get((src, dst), 0) + count
        changed = np.nonzero((np.sort(old_rows, axis=1) != np.sort(new_rows, axis=1)).any(axis=1))[
            0
        ]
        self.total += len(names)
        self.moved += changed.size
        return changed, old_rows, new_rows

    @property
    def fraction(self) -> float:
        return self.moved / self.total if self.total else 0.0

    def matrix_by_label(self) -> dict[str, dict[str, int]]:
        """{old member: {new member: names}} with relay-syntax labels."""
        table: dict[str, dict[str, int]] = {}
        for (src, dst), count in sorted(self.matrix.items()):
            row = table.setdefault(self.old.members[src].relay_syntax, {})
            row[self.new.members[dst].relay_syntax] = count
        return table
