"""Whisper files read and written directly: fill (merge history) and verify.

A migration ends in a fill: the new owner of a metric has been writing a file
since the switch, the old owner holds its history. `fill_file` merges SRC's
history into DST without ever changing a point DST already has; `verify_file`
checks that every SRC point within DST's retention is present in DST.

Both files are mapped whole and merged by the C merge (`_whisper.c`; its
numpy twin `plan_fill_numpy` handles the archives as arrays of big-endian
`>Ld` points, and the tests hold both to the same writes); only the filled
runs of slots are written back. No per-point whisper calls: that is where
carbonate's fill spends its 80 ms a file.

The fill rules, for every DST archive, finest first (`now` fixes the windows):

- An archive's window is the `points` intervals ending at `now` aligned to its
  step (exactly what whisper's fetch returns for it). A slot is a point when its
  stored timestamp is the interval the slot stands for; anything else (0, a
  stale or foreign timestamp, an archive whose first slot is 0) is empty.
- A point present in DST is never changed; 0.0 and NaN are values like any
  other (carbonate takes 0.0 for a gap and overwrites it).
- An empty DST slot is filled, in this order of preference:
  1. coarser archives only, and only for intervals that start inside the
     finest DST archive's window: the aggregate recomputed from the merged
     (already filled) next finer DST archive, with DST's method and
     xFilesFactor -- what carbon itself would have propagated had it received
     the merged points. This fixes the interval that straddles the switch, where
     SRC's aggregate covers only SRC's part of it;
  2. SRC's point at the same precision (an SRC archive with the same step);
  3. the aggregate of a finer SRC archive whose step divides DST's, finest
     first, with DST's method and xFilesFactor (known/total >= xFilesFactor).
  Outside the finest window, coarser archives thus get SRC's points (2, then 3).
- Coarse data is never spread into finer archives, and an SRC archive whose
  step does not divide DST's step is never used for it (there is no honest
  way to split or regroup its intervals).
- A missing DST becomes an exact copy of SRC, written to a temporary file and
  linked into place (never over a DST that appeared meanwhile: then it is
  filled). A corrupt SRC is skipped; a corrupt DST is skipped unless
  `move_corrupt`, which renames it to `<DST>.corrupt-<unix time>` and copies.
- DST is changed only under flock(LOCK_EX), the lock carbon takes with
  WHISPER_LOCK_WRITES, and the lock is released on every path (the file
  descriptor is closed in `finally`). SRC is read under flock(LOCK_SH), held
  until DST is written; a SRC and DST that are one file (hard links) are
  skipped, since the second lock would wait for the first forever.
- An empty DST archive (no base) gets its base at the first filled interval,
  as whisper's first write would; one that holds stale bytes is written whole,
  zeros around the new points, so that no stale slot reads as a point.

The package, one module per concern (import the names from here): `header`
(the format), `timelines` (archives as arrays, aggregation), `merge` (the C
merge and its numpy twin), `files` (one file pair under locks),
`verification` (verify one pair), `trees` (whole trees, in parallel).
"""

from __future__ import annotations

from carbonscale.whisper.files import (
    COPIED,
    FILLED,
    REPLACED,
    SKIPPED,
    UNCHANGED,
    FillResult,
    fill_file,
    fill_snapshot,
    read_whisper,
)
from carbonscale.whisper.header import (
    AGGREGATION_METHODS,
    ARCHIVE_INFO,
    HEADER,
    MAX_ARCHIVES,
    POINT_SIZE,
    ArchiveInfo,
    CorruptWhisper,
    Header,
    parse_header,
)
from carbonscale.whisper.merge import (
    RUN_GAP,
    ArchivePatch,
    Writes,
    _whisper,
    apply_writes,
    fill_data,
    patch_writes,
    plan_fill_numpy,
)
from carbonscale.whisper.timelines import (
    Timeline,
    aggregate,
    read_timeline,
    window_start,
)
from carbonscale.whisper.trees import (
    FillSummary,
    VerifySummary,
    fill,
    resolve_pair,
    run_jobs,
    verify,
    whisper_files,
)
from carbonscale.whisper.verification import (
    MISSING_EXAMPLES,
    VerifyResult,
    verify_data,
    verify_data_numpy,
    verify_file,
)

__all__ = [
    "AGGREGATION_METHODS",
    "ARCHIVE_INFO",
    "COPIED",
    "FILLED",
    "HEADER",
    "MAX_ARCHIVES",
    "MISSING_EXAMPLES",
    "POINT_SIZE",
    "REPLACED",
    "RUN_GAP",
    "SKIPPED",
    "UNCHANGED",
    "ArchiveInfo",
    "ArchivePatch",
    "CorruptWhisper",
    "FillResult",
    "FillSummary",
    "Header",
    "Timeline",
    "VerifyResult",
    "VerifySummary",
    "Writes",
    "_whisper",
    "aggregate",
    "apply_writes",
    "fill",
    "fill_data",
    "fill_file",
    "fill_snapshot",
    "parse_header",
    "patch_writes",
    "plan_fill_numpy",
    "read_timeline",
    "read_whisper",
    "resolve_pair",
    "run_jobs",
    "verify",
    "verify_data",
    "verify_data_numpy",
    "verify_file",
    "whisper_files",
    "window_start",
]
