"""The per-series metadata cache file: what it writes, and what it refuses to trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stockade import metacache

A = ("1.2.3.1", "a" * 64)
B = ("1.2.3.2", "b" * 64)


def test_place_is_named_by_a_hash_and_stays_under_the_cache(tmp_path: Path) -> None:
    hostile = "../../etc/passwd"
    path = Path(metacache.place(tmp_path, hostile, "1.2"))
    assert path.is_relative_to(tmp_path / "cache" / "metadata")
    assert "passwd" not in str(path) and ".." not in path.parts
    assert metacache.place(tmp_path, "1.2", "1.3") != metacache.place(tmp_path, "1.2", "1.4")


def test_stamp_depends_on_the_set_of_instances_and_their_hashes() -> None:
    assert metacache.stamp([A, B]) == metacache.stamp([B, A])
    assert metacache.stamp([A, B]) != metacache.stamp([A])
    assert metacache.stamp([A]) != metacache.stamp([(A[0], "c" * 64)])
    assert metacache.stamp([]).startswith("0-")


def test_saved_file_gives_the_answer_and_each_object_back(tmp_path: Path) -> None:
    path = metacache.place(tmp_path, "1.2", "1.3")
    objects = [(A, b'{"x":"a,b]"}'), (B, b'{"y":[1,2]}')]
    body = metacache.save(path, metacache.stamp([A, B]), objects)
    assert json.loads(body) == [{"x": "a,b]"}, {"y": [1, 2]}]
    cached = metacache.load(path)
    assert cached is not None
    assert cached.stamp == metacache.stamp([A, B]).encode()
    assert cached.body == body
    assert cached.objects() == dict(objects)


def test_an_empty_series_round_trips(tmp_path: Path) -> None:
    path = metacache.place(tmp_path, "1.2", "1.3")
    assert metacache.save(path, metacache.stamp([]), []) == b"[]"
    cached = metacache.load(path)
    assert cached is not None and cached.body == b"[]" and cached.objects() == {}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"stamp only",
        b"stamp\nno body line",
        b"s\n1.2 abc\n[{}]",  # two fields
        b"s\n1.2 abc x\n[{}]",  # length not a number
        b"s\n1.2 abc -2\n[{}]",
        b"s\n1.\xff abc 2\n[{}]",  # not ASCII
    ],
)
def test_a_file_that_does_not_parse_is_a_miss(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert metacache.load(str(path)) is None


@pytest.mark.parametrize(
    "content",
    [
        b"s\n1.2 abc 3\n[{}]",  # longer than the object
        b"s\n1.2 abc 1\n[{}]",  # shorter
        b"s\n1.2 abc 2,1.3 abd 2\n[{}]",  # more entries than objects
        b"s\n1.2 abc 2\n[{},{}]",  # fewer
        b"s\n1.2 abc 2,1.3 abd 2\n[{}:{}]",  # separator is not a comma
        b"s\n1.2 abc 2\n({})",  # not an array
        b"s\n\n[{}]",  # no entry for an object
    ],
)
def test_lengths_that_do_not_describe_the_body_give_no_object(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    cached = metacache.load(str(path))
    assert cached is not None
    assert cached.objects() == {}


def test_missing_file_is_a_miss_and_unwritable_folder_only_costs_speed(tmp_path: Path) -> None:
    assert metacache.load(str(tmp_path / "none.json")) is None
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"a file where the folder should be")
    path = metacache.place(tmp_path, "1.2", "1.3")
    assert metacache.save(path, "s", [(A, b"{}")]) == b"[{}]"
    assert metacache.load(path) is None
