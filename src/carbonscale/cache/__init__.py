"""SSD write-back caches under the whisper filesystem: state, boot, safe halt, report.

Two backends, both device-mapper targets:

- flashcache (out of tree, Facebook): `flashcache_create -p back`, reloaded at
  boot with `flashcache_load`; per-cache sysctls under
  `dev.flashcache.<ssd>+<disk>.*` (the basenames of the two devices). Its dirty
  block count is in `dmsetup table <name>` (`dirty blocks(N), dirty
  percent(P)`, flashcache_status_table); `dmsetup status <name>` carries the
  I/O and error counters (flashcache_status_info) but no dirty count.
- lvmcache (dm-cache through LVM): the origin LV converted with `lvconvert
  --type cache --cachepool ... --cachemode writeback`; dirty blocks in `lvs -o
  cache_dirty_blocks`.

A write-back cache still attached at halt panicked kernels (flashcache issues
#58, #84). `halt` is the hook that prevents it: stop what uses the whisper
filesystem, sync, unmount it (refuse to go on if it is busy: the cache is
kept), flush the cache while logging how many dirty blocks are left, then
remove it, all bounded by a timeout that says what is left when it expires.

Every external program is run through `Host`, so tests (and the ssd_cache
molecule scenario) put fake `dmsetup`, `lvs`, ... first in PATH and the code
under test is this same code.

The package, one module per concern (import the names from here): `parsers`
(the programs' output), `config` (ssd-cache.json), `host` (programs and
clocks), `backends` (flashcache, lvmcache), `operations` (check, start,
halt), `reporting` (dirty blocks to carbon).
"""

from __future__ import annotations

from carbonscale.cache.backends import (
    FLASHCACHE_REPORTED_COUNTERS,
    KERNEL_TARGETS,
    LVS_FIELDS,
    PROGRAMS,
    Backend,
    Flashcache,
    Lvmcache,
    backend_for,
)
from carbonscale.cache.config import (
    BACKENDS,
    TIMEOUT_ACTIONS,
    CacheConfig,
    FlashcacheConfig,
    LvmcacheConfig,
    config_from_dict,
    load_config,
)
from carbonscale.cache.host import (
    Host,
    Result,
)
from carbonscale.cache.operations import (
    check,
    halt,
    start,
)
from carbonscale.cache.parsers import (
    CacheState,
    lvmcache_state,
    parse_dmsetup_targets,
    parse_flashcache_status,
    parse_flashcache_table,
    parse_keyed_values,
    parse_lvs_nameprefixes,
)
from carbonscale.cache.reporting import (
    metric_points,
    report,
)

__all__ = [
    "BACKENDS",
    "FLASHCACHE_REPORTED_COUNTERS",
    "KERNEL_TARGETS",
    "LVS_FIELDS",
    "PROGRAMS",
    "TIMEOUT_ACTIONS",
    "Backend",
    "CacheConfig",
    "CacheState",
    "Flashcache",
    "FlashcacheConfig",
    "Host",
    "Lvmcache",
    "LvmcacheConfig",
    "Result",
    "backend_for",
    "check",
    "config_from_dict",
    "halt",
    "load_config",
    "lvmcache_state",
    "metric_points",
    "parse_dmsetup_targets",
    "parse_flashcache_status",
    "parse_flashcache_table",
    "parse_keyed_values",
    "parse_lvs_nameprefixes",
    "report",
    "start",
]
