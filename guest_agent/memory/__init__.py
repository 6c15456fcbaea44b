"""Guest memory model: buddy allocator with free page reporting, workloads, shared RAM, procfs."""

from .buddy import MAX_ORDER, PAGEBLOCK_ORDER, BuddyAllocator

__all__ = ["BuddyAllocator", "MAX_ORDER", "PAGEBLOCK_ORDER"]
