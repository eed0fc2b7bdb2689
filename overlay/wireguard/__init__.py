"""WireGuard adapters: the UAPI and netlink backends, the wireguard-go process,
the overlay service."""
