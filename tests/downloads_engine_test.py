"""Which archive names DownloadFile serves (gateway/downloads.py find_archived),
on a real archive folder: plain names and archive paths inside it; no '..',
no path out of it, no symlink pointing out, no file without its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.downloads import PermissionDenied, find_archived
from services.common.errors import InvalidInput, NotFound

NAME = "alice_20260102T030405006Z_lobby.mp4"


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    day = root / "2026-01-02"
    day.mkdir(parents=True)
    (day / NAME).write_bytes(b"mp4 bytes")
    (day / NAME).with_suffix(".json").write_text(json.dumps({"user_id": "alice", "trace_id": "t1"}))
    return root


def test_a_plain_name_and_its_archive_path_find_the_file(archive: Path) -> None:
    by_name = find_archived(archive, NAME)
    assert by_name.path == archive / "2026-01-02" / NAME
    assert (by_name.user_id, by_name.trace_id) == ("alice", "t1")
    assert find_archived(archive, str(archive / "2026-01-02" / NAME)).path == by_name.path
    assert find_archived(archive, f"2026-01-02/{NAME}").path == by_name.path


@pytest.mark.parametrize(
    ("given", "error", "words"),
    [
        ("", InvalidInput, "empty"),
        ("../../etc/passwd", InvalidInput, "'..'"),
        ("2026-01-02/../../../etc/passwd", InvalidInput, "'..'"),
        ("/etc/passwd", PermissionDenied, "not in the archive"),
        ("/etc/2026-01-02/" + NAME, PermissionDenied, "not in the archive"),
        ("passwd", InvalidInput, "not an archive name"),
        ("alice_20260102T030405006Z_lobby.json", InvalidInput, "not an archive name"),
        ("alice_lobby.mp4", InvalidInput, "no date stamp"),
        ("a\\..\\b.mp4", InvalidInput, "'..'"),
        ("bob_20260102T030405006Z_lobby.mp4", NotFound, "No archived file"),
    ],
)
def test_bad_names_are_refused_with_a_sentence(
    archive: Path, given: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as caught:
        find_archived(archive, given)
    assert words in str(caught.value)


def test_a_symlink_out_of_the_archive_is_refused(archive: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"not yours")
    link = archive / "2026-01-02" / "eve_20260102T030405006Z_x.mp4"
    link.symlink_to(secret)
    link.with_suffix(".json").write_text("{}")
    with pytest.raises(PermissionDenied, match="out of the archive"):
        find_archived(archive, link.name)
    # A date folder that is itself a link out.
    (archive / "2026-01-03").symlink_to(tmp_path)
    (tmp_path / "eve_20260103T030405006Z_x.mp4").write_bytes(b"x")
    with pytest.raises(PermissionDenied):
        find_archived(archive, "eve_20260103T030405006Z_x.mp4")


def test_a_file_without_its_record_is_not_served(archive: Path) -> None:
    (archive / "2026-01-02" / NAME).with_suffix(".json").unlink()
    with pytest.raises(NotFound, match="no archive record"):
        find_archived(archive, NAME)
