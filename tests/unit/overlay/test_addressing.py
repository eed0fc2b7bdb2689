import ipaddress

from overlay.addressing import is_in_swarm, node_address, swarm_prefix, vm_address


def test_prefix_is_a_ula_48_and_stable():
    prefix = swarm_prefix("alpha")
    assert prefix.prefixlen == 48
    assert prefix.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert swarm_prefix("alpha") == prefix
    assert swarm_prefix("beta") != prefix


def test_node_and_vm_addresses_live_in_their_subnets():
    node = node_address("alpha", bytes(32))
    vm = vm_address("alpha", b"job-1")
    assert is_in_swarm("alpha", node) and is_in_swarm("alpha", vm)
    assert not is_in_swarm("beta", node)
    assert node.packed[6:8] == b"\x00\x00"
    assert vm.packed[6:8] == b"\x00\x01"
    assert vm_address("alpha", b"job-2") != vm


def test_ten_thousand_node_addresses_do_not_collide():
    addresses = {node_address("alpha", i.to_bytes(32, "big")) for i in range(10_000)}
    assert len(addresses) == 10_000
