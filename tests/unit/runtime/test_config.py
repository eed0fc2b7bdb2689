import pytest

from node.runtime import config


def load_text(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults_are_valid():
    loaded = config.load(None)
    assert loaded["network.listen"] == "0.0.0.0:7946"
    assert loaded["network.mdns"] is True
    assert loaded.control_socket == loaded.state_dir / "control.sock"


def test_the_image_store_is_the_state_dirs_unless_named(tmp_path):
    assert config.load(None).image_store == config.load(None).state_dir / "images"
    named = load_text(tmp_path, f'[vm]\nimage_store = "{tmp_path / "imgs"}"\n')
    assert named.image_store == tmp_path / "imgs"


def test_a_full_file_is_read(tmp_path):
    loaded = load_text(
        tmp_path,
        '[node]\nstate_dir = "/tmp/x"\nswarm_id = "s"\n'
        '[network]\nlisten = "198.51.100.1:7000"\n'
        'bootstrap = ["198.51.100.2:7946"]\nmdns = false\n',
    )
    assert loaded["network.bootstrap"] == ["198.51.100.2:7946"]
    assert loaded["network.mdns"] is False


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[network]\nlisten = "nonsense"\n', "network.listen"),
        ("[network]\nmdns = 1\n", "network.mdns"),
        ('[network]\nbootstrap = ["198.51.100.1"]\n', "network.bootstrap"),
        ("[network]\nwireguard_port = 70000\n", "network.wireguard_port"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[node]\nswarm_id = ""\n', "node.swarm_id"),
        ("[node]\nstate_dirr = '/x'\n", "node.state_dirr"),
        ("[nodes]\nx = 1\n", "nodes"),
        ("[record]\nlifetime_s = 5\n", "record.lifetime_s"),
        ('[vm]\nmigration_uri = "qemu+ssh://h/system?command=/bin/sh"\n', "vm.migration_uri"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(config.ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert message.startswith(field + ":")
    assert "\n" not in message


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[network\n")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")
