"""The key names an operator finds under a prefix, and the Cluster slots they share."""

from __future__ import annotations

import re

from cachemw.core import keyspace


def _hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the first {...} with something inside, else the whole key."""
    match = re.search(r"{([^}]+)}", key)
    return match.group(1) if match else key


def test_an_entry_its_lock_and_its_wait_flag_share_one_slot() -> None:
    entry = keyspace.entry_key("shop", "/items/<id>", "0123abcd")
    assert entry == "shop:e:/items/<id>:{0123abcd}"
    assert {_hash_tag(k) for k in (entry, keyspace.lock_key(entry), keyspace.wait_key(entry))} == {"0123abcd"}


def test_the_entry_pattern_matches_entries_and_not_their_locks() -> None:
    entry = keyspace.entry_key("shop", "/x", "ff")
    pattern = re.compile(keyspace.entry_pattern("shop").replace("*", ".*").replace("{", r"\{").replace("}", r"\}"))
    assert pattern.fullmatch(entry) and not pattern.fullmatch(keyspace.lock_key(entry))


def test_a_tags_index_and_generation_share_one_slot_and_differ_by_tag() -> None:
    index, generation = keyspace.tag_keys("shop", "product:1")
    assert index.startswith("shop:t:{") and generation.startswith("shop:g:{")
    assert _hash_tag(index) == _hash_tag(generation)
    assert keyspace.tag_keys("shop", "product:2") != (index, generation)


def test_everything_lives_under_the_prefix() -> None:
    names = [keyspace.fill_channel("p"), keyspace.invalidation_channel("p"), keyspace.fleet_key("p", "h", 1, "i"),
             keyspace.writebehind_base("p", "orders"), keyspace.everything_pattern("p"),
             keyspace.fleet_pattern("p"), keyspace.writebehind_pattern("p")]
    assert all(name.startswith("p:") for name in names)
    assert _hash_tag(keyspace.writebehind_base("p", "orders") + ":stream") == "orders"
