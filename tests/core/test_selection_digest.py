"""Selection regression: the selected ids of fixed inputs, pinned as sha256 digests.

The digests were computed on the code before the registry refactor (issue 13); any change of the
k-means, the quotas, the tie-break hashes or the baselines' scores shows up here. The inputs are
well-separated blobs, so the labels do not hinge on the last bit of a distance (robust to another
CPU or faiss build); the selection within a cluster is the hash order, which is exact.
The real-pipeline twin of this test is in tests/e2e/test_pipeline_digest.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from s2l_ray.core import kmeans, selection

N, T, K, SEED = 600, 5, 6, 7


def ids_digest(ids: list[str]) -> str:
    """sha256 of the ids in selection order, one per line."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _data() -> tuple[list[str], np.ndarray, list[str | None]]:
    rs = np.random.RandomState(1234)  # RandomState: the same stream on every numpy version
    centers = rs.uniform(0.5, 4.0, size=(K, T)).astype(np.float32)
    centers.sort(axis=1)
    centers = centers[:, ::-1].copy()  # decreasing losses, like trajectories
    which = np.arange(N) % K
    x = (centers[which] + rs.normal(0, 0.02, size=(N, T))).astype(np.float32)
    ids = [f"ex-{i:04d}" for i in range(N)]
    sources = [("gsm", "math", "code", None)[i % 4] for i in range(N)]
    return ids, x, sources


def _labels(ids: list[str], x: np.ndarray) -> np.ndarray:
    return kmeans.fit(ids, x, K, seed=SEED, max_iter=20, normalize="standardize",
                      n_shards=3).labels


PINNED = {
    "labels": "5760d98ebf4e2dbec97bc6c36bfd3b4087149ce021192163033ce2a0b1a036d5",
    "s2l": "95bef4d8ff7a3aaf31619c76ba3ec123efb61b9b1cf054f96ef0f542d9b2700e",
    "random": "cfa088f10cb219662685bc3433f817f7bc261582b33ffa77a37b97be0f1b0bbc",
    "stratified": "f10fac3c1339bca2abaaab7554b2a8a1abb6f6244107e4bef3f2ca4c53491661",
    "least_confidence": "ec073db29d8e4330f8983b2b7d223842bc704121ac0e2f3f0c6a998a0c044abf",
    "middle_perplexity": "f625933dcabbd4ee4fef76c1206ab27403a0c9b8e4ed0361785dabb1f2e4d069",
    "high_learnability": "bcd1524ec45aa27744485ac9e657232e3fea1a885f04c19a111d8fa18527494e",
    "el2n": "c680ffce92bf961a3acd32f8031853a8c15a9e03d443fc688b01b4773a8f0c93",
}


def test_labels_digest() -> None:
    ids, x, _ = _data()
    lab = _labels(ids, x)
    assert np.bincount(lab, minlength=K).tolist() == [N // K] * K  # the blobs are found
    got = ids_digest([f"{i}:{c}" for i, c in zip(ids, lab.tolist())])
    assert got == PINNED["labels"]


@pytest.mark.parametrize("method", [m for m in PINNED if m != "labels"])
def test_selection_digest(method: str) -> None:
    ids, x, sources = _data()
    chosen = selection.select(method, ids, 0.15, SEED, labels=_labels(ids, x), sources=sources,
                              losses=x, early_fraction=0.4)
    assert len(chosen) == 90 and len(set(chosen)) == 90
    assert ids_digest(chosen) == PINNED[method], method
