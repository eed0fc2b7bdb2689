"""The VM side: libvirt runtime and its fake twin, replicas, save streams, verification."""
