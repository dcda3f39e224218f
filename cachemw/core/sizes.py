"""What an object costs the process, not what its payload measures: the bounds count these.

A 1 KiB body held by a store is a bytes object (33 B header), a key string (49 B
header), a tuple, a float and a slot in an ordered dict, each rounded up by the
allocator. Counting ``len(key) + len(value)`` let a 32 MiB memory store grow the
process by 108 MiB. Sizes here are computed once, when something is stored,
never on a hit.

The constants were measured on CPython 3.11 (64-bit) with ``tracemalloc`` (what
Python asks the allocator for), taking the worst point of each container's resize
cycle under LRU churn (insert one key, drop the oldest; 1,500 to 70,000 members),
so an accounted size is never below what ``tracemalloc`` sees for it.
"""

from __future__ import annotations

import sys

__all__ = ["DICT_SLOT", "FLOAT", "LRU_SLOT", "SET", "SET_MEMBER", "alloc", "bytes_cost", "str_cost", "tuple_cost"]

# pymalloc serves requests up to 512 B in 16 B steps; larger ones go to glibc's malloc,
# which adds an 8 B chunk header and rounds to 16 B.
_SMALL = 512

# Per member of a container, the worst seen over a resize cycle under churn:
LRU_SLOT = 150  # OrderedDict (table + its linked-list node): 146 B measured
DICT_SLOT = 80  # dict: 74 B measured
SET_MEMBER = 112  # set (grows 4x while small, so a fresh table is mostly empty): 105 B measured
SET = 224  # an empty set: 216 B, its 8 inline slots included
FLOAT = 32  # 24 B, rounded to pymalloc's 16 B step


def alloc(requested: int) -> int:
    """Bytes the allocator really hands out for a request of ``requested`` bytes."""
    if requested <= _SMALL:
        return (requested + 15) & ~15
    return (requested + 8 + 15) & ~15


def bytes_cost(value: bytes) -> int:
    return alloc(33 + len(value))  # sys.getsizeof(b"") == 33, without its call


def str_cost(value: str) -> int:
    if value.isascii():
        return alloc(49 + len(value))  # sys.getsizeof("") == 49, one byte a character
    return alloc(sys.getsizeof(value))


def tuple_cost(length: int) -> int:
    return alloc(40 + 8 * length)  # GC header and length included
