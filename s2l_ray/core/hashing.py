"""Hashes of example ids: BLAKE2b, so they are the same on any machine, Python and run.

    hash_ids(ids, seed, salt)  keyed 64-bit hashes (n,) uint64: tie-breaks and samples that
                               depend on the id only (k-means init, the selection order)
    hash64(id)                 unkeyed 64-bit: ingest's duplicate finding
    hash128(id)                unkeyed 2 x 64-bit: the trajectory stage's groups and digests
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def hash_ids(ids: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """64-bit keyed BLAKE2b of every id: (n,) uint64, the same on any machine and Python."""
    key = f"{seed}:{salt}".encode()
    b2 = hashlib.blake2b
    return np.frombuffer(b"".join(b2(str(i).encode(), digest_size=8, key=key).digest()
                                  for i in ids), dtype="<u8").astype(np.uint64)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def hash128(text: str) -> tuple[int, int]:
    d = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")
