import stat

import pytest

from node.base.identity import IdentityError, NodeId
from node.runtime.keystore import load_or_create


def test_keys_are_created_private_and_reloaded(tmp_path):
    first = load_or_create(tmp_path)
    for name in ("node.key", "wireguard.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    again = load_or_create(tmp_path)
    assert again.node_id == first.node_id
    assert again.wireguard_public == first.wireguard_public
    assert first.wireguard_public != first.node_id.key


def test_node_id_prints_and_parses(tmp_path):
    node_id = load_or_create(tmp_path).node_id
    text = str(node_id)
    assert len(text) == 52 and text == text.lower()
    assert NodeId.parse(text) == node_id
    assert NodeId.parse(text.upper()) == node_id
    assert text.startswith(node_id.short) and len(node_id.short) == 12


@pytest.mark.parametrize("bad", ["", "abc", "0" * 52, "a" * 51])
def test_bad_node_id_text_is_refused(bad):
    with pytest.raises(ValueError):
        NodeId.parse(bad)


def test_truncated_key_file_is_an_error_not_a_new_identity(tmp_path):
    load_or_create(tmp_path)
    (tmp_path / "node.key").write_bytes(b"short")
    with pytest.raises(IdentityError, match="refusing to replace"):
        load_or_create(tmp_path)
    assert (tmp_path / "node.key").read_bytes() == b"short"
