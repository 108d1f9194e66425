"""connector.keys: the connector's key ring on a real state directory."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from connector.keys import KeyRing
from tunnel.sealing import key_id, new_data_key, open_key, public_bytes, seal_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_private_key_files(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path / "state")
    keys_dir = tmp_path / "state" / "keys"
    assert mode(keys_dir) == 0o700
    key_file = keys_dir / f"{ring.current_key_id}.pem"
    assert mode(key_file) == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert len(ring.current_public) == 32
    assert ring.current_key_id == key_id(ring.current_public)
    assert ring.all_public == {ring.current_key_id: ring.current_public}
    assert public_bytes(ring.private_for(ring.current_key_id)) == ring.current_public


def test_reload_gives_same_key(tmp_path: Path) -> None:
    first = KeyRing.load_or_create(tmp_path)
    second = KeyRing.load_or_create(tmp_path)
    assert second.current_key_id == first.current_key_id
    assert second.current_public == first.current_public
    sealed = seal_key(b"k" * 32, first.current_public, context=b"job1")
    assert open_key(sealed, second.private_for(second.current_key_id), context=b"job1") == b"k" * 32


def test_rotation_keeps_old_keys_usable(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    old_id, old_public = ring.current_key_id, ring.current_public
    dek = new_data_key()
    queued = seal_key(dek, old_public, context=b"queued-job")

    new_id = ring.rotate()
    assert new_id == ring.current_key_id != old_id
    assert ring.current_public != old_public
    assert set(ring.all_public) == {old_id, new_id}
    assert open_key(queued, ring.private_for(old_id), context=b"queued-job") == dek

    reloaded = KeyRing.load_or_create(tmp_path)
    assert reloaded.current_key_id == new_id
    assert open_key(queued, reloaded.private_for(old_id), context=b"queued-job") == dek
    for kid in (old_id, new_id):
        assert mode(tmp_path / "keys" / f"{kid}.pem") == 0o600


def test_retire_drops_old_key_only(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    old_id = ring.current_key_id
    new_id = ring.rotate()
    with pytest.raises(ValueError, match="it is the current key"):
        ring.retire(new_id)
    ring.retire(old_id)
    assert set(ring.all_public) == {new_id}
    assert not (tmp_path / "keys" / f"{old_id}.pem").exists()
    with pytest.raises(KeyError, match=r"no connector key .* retired"):
        ring.private_for(old_id)
    with pytest.raises(KeyError, match="no such key"):
        ring.retire(old_id)
    assert set(KeyRing.load_or_create(tmp_path).all_public) == {new_id}


def test_unknown_key_id_is_a_clear_key_error(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    with pytest.raises(KeyError, match="no connector key '0123456789abcdef'"):
        ring.private_for("0123456789abcdef")


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644])
def test_refuses_key_file_readable_by_others(tmp_path: Path, bad_mode: int) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    key_file = tmp_path / "keys" / f"{ring.current_key_id}.pem"
    key_file.chmod(bad_mode)
    with pytest.raises(
        PermissionError, match=f"accessible by group/others \\(mode 0{bad_mode:o}\\).*chmod 600"
    ):
        KeyRing.load_or_create(tmp_path)


def test_missing_current_pointer_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    KeyRing.load_or_create(tmp_path)
    (tmp_path / "keys" / "current").unlink()
    with pytest.raises(ValueError, match="current is missing but 1 key"):
        KeyRing.load_or_create(tmp_path)


def test_current_pointing_at_missing_key_is_an_error(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    (tmp_path / "keys" / f"{ring.current_key_id}.pem").unlink()
    with pytest.raises(ValueError, match="has no such key file"):
        KeyRing.load_or_create(tmp_path)


def test_renamed_key_file_is_refused(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    keys_dir = tmp_path / "keys"
    (keys_dir / f"{ring.current_key_id}.pem").rename(keys_dir / "ffffffffffffffff.pem")
    with pytest.raises(ValueError, match="its name must be"):
        KeyRing.load_or_create(tmp_path)
