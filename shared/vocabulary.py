"""The protocol's words and numbers, defined once (docs/PROTOCOL.md §3, §6, §10).

Feature names, batch kinds, the page size and every wire limit live here and nowhere
else: the guest agent, the host daemon and the benchmarks import them, so a name or a
bound can't drift between two copies. Plain constants only — importing this module costs
nothing and pulls in nothing.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
#: The guest page size the protocol speaks in (x86-64 and the virtio balloon's 4 KiB pages).
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- feature names (HELLO/WELCOME, §6) ------------------------------------------------
RANGES52 = "ranges52"  # 52-bit PFN + 12-bit count words (§3.1); the default encoding
PFN32 = "pfn32"  # the legacy balloon's 32-bit PFN arrays (§3.2)
HINTING = "hinting"  # free page hinting (HINT_START / HINT / HINT_DONE / HINT_STOP)
STATS = "stats"  # STATS messages
SHARED_RAM = "shared-ram"  # guest RAM is a host file mapped MAP_SHARED
DEFLATE_ON_OOM = "deflate-on-oom"  # VIRTIO_BALLOON_F_DEFLATE_ON_OOM
#: Range encodings; exactly one is in force per session (pfn32 wins when both are accepted).
ENCODINGS = (RANGES52, PFN32)
KNOWN_FEATURES = (RANGES52, PFN32, HINTING, STATS, SHARED_RAM, DEFLATE_ON_OOM)

# --- batch kinds: the five messages the host acknowledges (§4, §7) ---------------------
REPORT = "report"
REUSE = "reuse"
INFLATE = "inflate"
DEFLATE = "deflate"
HINT = "hint"
#: In wire-type order (REPORT 3, REUSE 5, INFLATE 6, DEFLATE 7, HINT 10).
BATCH_KINDS = (REPORT, REUSE, INFLATE, DEFLATE, HINT)

# --- STATS tags (virtio spec 5.5.6.3, include/uapi/linux/virtio_balloon.h) --------------
# Tags 0-9 are in the spec, 10-15 since Linux 6.12; a receiver ignores tags it does not know.
STAT_SWAP_IN = 0  # VIRTIO_BALLOON_S_SWAP_IN
STAT_SWAP_OUT = 1  # VIRTIO_BALLOON_S_SWAP_OUT
STAT_MAJOR_FAULTS = 2  # VIRTIO_BALLOON_S_MAJFLT
STAT_MINOR_FAULTS = 3  # VIRTIO_BALLOON_S_MINFLT
STAT_FREE = 4  # VIRTIO_BALLOON_S_MEMFREE: memory the guest does not use at all
STAT_TOTAL = 5  # VIRTIO_BALLOON_S_MEMTOT: memory the guest kernel sees
STAT_AVAILABLE = 6  # VIRTIO_BALLOON_S_AVAIL: MemAvailable
STAT_CACHES = 7  # VIRTIO_BALLOON_S_CACHES: file-backed, reclaimable
STAT_HTLB_PGALLOC = 8  # VIRTIO_BALLOON_S_HTLB_PGALLOC
STAT_HTLB_PGFAIL = 9  # VIRTIO_BALLOON_S_HTLB_PGFAIL
STAT_OOM_KILLS = 10  # VIRTIO_BALLOON_S_OOM_KILL (Linux 6.12)
STAT_ALLOC_STALLS = 11  # VIRTIO_BALLOON_S_ALLOC_STALL (Linux 6.12)

# --- limits (§10) -----------------------------------------------------------------------
U64_MAX = (1 << 64) - 1
PFN_BITS = 52
COUNT_BITS = 12
MAX_PFN = (1 << PFN_BITS) - 1
MAX_INLINE_COUNT = (1 << COUNT_BITS) - 1  # 4095: count 4096 needs the escape
#: Largest guest a HELLO may announce, in pages (every PFN fits in 52 bits).
MAX_GUEST_PAGES = 1 << PFN_BITS
#: The legacy balloon's array: 256 PFNs per message.
PFN32_MAX_PER_MESSAGE = 256
#: The seed's fixed batch buffer (v6 of the 2016 series): 4096 words = 32 KiB.
SEED_BUFFER_WORDS = 4096
#: Largest message either side accepts unless told otherwise (WELCOME max_message_bytes).
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_WINDOW = 1 << 16
MAX_RANGES_LIMIT = 1 << 24
MAX_CMD_ID = (1 << 32) - 1
MAX_STAT_TAG = 0xFFFF
MAX_FEATURES = 32
MAX_NAME_LEN = 64  # guest ids, feature names, error codes
MAX_TEXT_LEN = 1024  # BYE reasons, ERROR details
MAX_TOKEN_LEN = 256
MAX_PATH_LEN = 4096  # WELCOME ram_file
MAX_STATS = 64
# Structural limits of the msgpack decoder (§2.1).
MAX_STR_BYTES = 64 * 1024
MAX_ARRAY_LEN = 1024
MAX_MAP_LEN = 64
#: Deepest nesting a v1 message uses: STATS is ``[13, [[tag, value], ...]]`` (depth 3).
MAX_DEPTH = 3
#: msgpack objects in one message (every container, key and value counts): STATS, the
#: largest v1 message, holds 195; HELLO with every optional key and 32 features about 50.
MAX_OBJECTS = 512
WORD_BYTES = 8  # one ranges52 word (§3.1)
