"""Fixtures the testbed's VM modules share: the demo guest and two libvirt hosts (kit/vm_lab)."""

from kit.vm_lab import guest, hosts, lab

__all__ = ["guest", "hosts", "lab"]
