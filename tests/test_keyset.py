"""KeySet: 8-byte fingerprints in a sorted array plus a small recent set."""

import numpy as np

from batchtag.keyset import MERGE_EVERY, KeySet, fingerprint, fingerprint_bytes, sorted_unique


def test_keyset_membership_across_merges():
    keys = KeySet()
    assert keys.add("a") and not keys.add("a")
    for i in range(MERGE_EVERY + 10):
        keys.add(f"k{i}")
    assert "k0" in keys and f"k{MERGE_EVERY + 9}" in keys and "a" in keys and "zzz" not in keys
    assert not keys.add("k5") and len(keys) == MERGE_EVERY + 11
    assert keys.nbytes < 9 * len(keys) + 60 * 100  # about 8 bytes a key once merged


def test_fingerprint_of_a_key_equals_that_of_its_bytes_even_for_undecodable_names():
    name = "/photos/caf\udce9.jpg"  # a Latin-1 byte in a path, kept as a surrogate escape
    assert fingerprint(name) == fingerprint_bytes(b"/photos/caf\xed\xb3\xa9.jpg")
    assert fingerprint(name) != fingerprint("/photos/café.jpg")
    assert 0 <= fingerprint("x") < 2**64


def test_contains_many_sees_both_merged_and_recent_keys():
    merged = KeySet.from_array(np.array([fingerprint(f"old{i}") for i in range(50)], dtype=np.uint64))
    merged.add("new")  # still in the recent set, not merged
    asked = np.array([fingerprint(k) for k in ("old0", "old49", "new", "absent")], dtype=np.uint64)
    assert merged.contains_many(asked).tolist() == [True, True, True, False]
    assert KeySet().contains_many(asked).tolist() == [False] * 4


def test_sorted_unique_sorts_and_drops_repeats():
    values = np.array([5, 1, 5, 3, 1, 9], dtype=np.uint64)
    assert sorted_unique(values).tolist() == [1, 3, 5, 9]
    assert sorted_unique(np.array([], dtype=np.uint64)).tolist() == []
    assert KeySet([7, 7, 2]).contains_many(np.array([2, 7, 3], dtype=np.uint64)).tolist() == [
        True,
        True,
        False,
    ]


def test_add_many_marks_what_is_new_against_the_set_and_earlier_in_the_chunk(monkeypatch):
    from batchtag import keyset

    monkeypatch.setattr(keyset, "MERGE_EVERY", 4)  # so the sorted part is used too
    keys = keyset.KeySet()
    assert keys.add_many([1, 2, 3, 2, 4]) == [True, True, True, False, True]  # merged after: 4 keys
    assert keys.add_many([5, 1, 5, 4, 6]) == [True, False, False, False, True]
    assert len(keys) == 6 and all(keys._has(fp) for fp in range(1, 7)) and not keys._has(7)
