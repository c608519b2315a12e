"""Vocabularies: how a raw id becomes an embedding row, stable across days.

An id vocabulary (``silver.user_vocab``, ``silver.item_vocab``) is declared by a :class:`VocabSpec` and laid out
as::

    index 0                      OOV_INDEX: out of vocabulary (a null id, or any unknown id when there is no hashing)
    1 .. hash_buckets            hashed buckets: an id not in the vocabulary -> 1 + murmur3(id) mod hash_buckets
    hash_buckets + 1 ..          the vocabulary proper, append-only

- **Append-only**: an id keeps its index forever; ids that qualify in a later run get ``max + 1`` onwards, in order
  of ``(first_seen, id)``. A model's embedding rows stay valid when the vocabulary grows.
- **Minimum count**: an id enters the vocabulary only once it has at least ``min_count`` events (counted over all
  of bronze, so a rare id that becomes frequent enters on the day it crosses the threshold); until then it maps to
  its hashed bucket, or to ``OOV_INDEX`` without hashing.
- **Hashing** (the hashing trick, Weinberger et al. 2009): for unbounded id spaces (the generator's
  high-cardinality fields, new users between two vocabulary builds) an unknown id shares one of ``hash_buckets``
  rows with the ids that collide with it instead of sharing the single OOV row with all of them. The hash is
  Spark's ``hash()`` of a 32-bit int (Murmur3 x86_32, seed 42), so the Spark job and this pure-Python reference
  agree bit for bit; the bucket layout cannot change once the vocabulary has rows (``VocabularyError``).
- **Versioned in Delta**: each run that adds ids is one Delta commit of the vocabulary table, whose
  ``userMetadata`` records the spec (:func:`commit_metadata`); a training set records the vocabulary versions it
  was indexed with, and ``versionAsOf`` gives back the mapping it used.

Nothing here needs Spark; ``pipelines.features_batch`` applies these rules to DataFrames.

>>> spec = VocabSpec("user", "user_id", "user_idx", min_count=2, hash_buckets=8)
>>> spec.first_index
9
>>> lookup(spec, {196: 9}, 196), lookup(spec, {196: 9}, None)
(9, 0)
>>> 1 <= lookup(spec, {196: 9}, 7) <= 8
True
>>> spark_hash_int(1), spark_hash_int(-7)   # Spark: SELECT hash(1), hash(-7)
(-559580957, -1618159745)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from features.definitions import UNKNOWN_INDEX
from features.errors import VocabularyError

#: The row of an id that is out of vocabulary (null, or unknown without hashing): the declared unknown index.
OOV_INDEX = UNKNOWN_INDEX
#: Seed of Spark's ``hash()`` expression (``Murmur3Hash``).
SPARK_HASH_SEED = 42


@dataclass(frozen=True)
class VocabSpec:
    """One id vocabulary.

    Args:
        name: ``user`` / ``item`` (the key in ``vocab_sizes.json``).
        id_col, idx_col: the raw id column and its index column.
        min_count: events (count) an id needs before it gets its own row; 1 keeps every id seen.
        hash_buckets: rows shared by out-of-vocabulary ids through a hash (0: they all map to ``OOV_INDEX``).

    Raises:
        ValueError: ``min_count`` < 1 or ``hash_buckets`` < 0.
    """

    name: str
    id_col: str
    idx_col: str
    min_count: int = 1
    hash_buckets: int = 0

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"vocabulary {self.name!r}: min_count must be >= 1, not {self.min_count}")
        if self.hash_buckets < 0:
            raise ValueError(f"vocabulary {self.name!r}: hash_buckets must be >= 0, not {self.hash_buckets}")

    @property
    def first_index(self) -> int:
        """The index of the vocabulary's first id: after OOV and the hashed buckets."""
        return OOV_INDEX + 1 + self.hash_buckets


#: The defaults of the MovieLens pipeline: every id seen once gets a row, unknown ids share row 0 (the demo's
#: figures depend on this layout).
USER_VOCAB_SPEC = VocabSpec("user", "user_id", "user_idx")
ITEM_VOCAB_SPEC = VocabSpec("item", "item_id", "item_idx")


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def spark_hash_int(value: int, seed: int = SPARK_HASH_SEED) -> int:
    """Spark's ``hash(col)`` of a 32-bit int column: Murmur3 x86_32 (Appleby) of the int's 4 bytes, as
    ``org.apache.spark.unsafe.hash.Murmur3_x86_32.hashInt``; a signed 32-bit result.

    Raises:
        ValueError: ``value`` is not a 32-bit int.
    """
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{value} is not a 32-bit int")
    k1 = (value & 0xFFFFFFFF) * 0xCC9E2D51 & 0xFFFFFFFF
    k1 = _rotl32(k1, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = _rotl32((seed & 0xFFFFFFFF) ^ k1, 13)
    h1 = (h1 * 5 + 0xE6546B64) & 0xFFFFFFFF
    h1 ^= 4  # the input length in bytes
    h1 ^= h1 >> 16
    h1 = h1 * 0x85EBCA6B & 0xFFFFFFFF
    h1 ^= h1 >> 13
    h1 = h1 * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - 2**32 if h1 >= 2**31 else h1


def hashed_index(spec: VocabSpec, value: int) -> int:
    """The hashed bucket of an out-of-vocabulary id: ``1 + pmod(hash(id), hash_buckets)``, in
    ``[1, hash_buckets]``; ``OOV_INDEX`` when the spec has no buckets."""
    if spec.hash_buckets == 0:
        return OOV_INDEX
    return OOV_INDEX + 1 + spark_hash_int(value) % spec.hash_buckets  # Python's % is Spark's pmod for a positive n


def lookup(spec: VocabSpec, vocabulary: Mapping[int, int], value: int | None) -> int:
    """The embedding row of ``value``: its own index, else its hashed bucket, else ``OOV_INDEX`` (the reference
    for ``pipelines.features_batch.index_column``)."""
    if value is None:
        return OOV_INDEX
    found = vocabulary.get(value)
    return found if found is not None else hashed_index(spec, value)


def commit_metadata(spec: VocabSpec) -> str:
    """The ``userMetadata`` of a vocabulary commit: the spec it was built with, as JSON."""
    return json.dumps({"vocab": asdict(spec)}, sort_keys=True)


def check_layout(spec: VocabSpec, recorded: str | None, table: str) -> None:
    """Refuse to grow a vocabulary with a bucket layout other than the one its rows were numbered with.

    Args:
        recorded: the ``userMetadata`` of the table's latest vocabulary commit (None: no commit recorded one).
        table: the table's name, for the message.

    Raises:
        VocabularyError: ``hash_buckets`` differs from the recorded one (every index would move).
    """
    if not recorded:
        return
    try:
        before = json.loads(recorded)["vocab"]
    except (ValueError, KeyError, TypeError):
        return  # a commit by something else (e.g. an older job): nothing recorded to check against
    if before.get("hash_buckets") != spec.hash_buckets:
        raise VocabularyError(
            f"vocabulary {table!r} was built with hash_buckets={before.get('hash_buckets')}, not "
            f"{spec.hash_buckets}: its indices start after the hashed buckets, so changing their number would move "
            f"every row; keep hash_buckets={before.get('hash_buckets')}, or rebuild the vocabulary (and retrain)")
