"""How to join a Ray cluster given by address; shared by ingest (img2dataset's Ray distributor) and training."""

from __future__ import annotations

from typing import Any


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """Keyword arguments for `ray.init` that join the cluster at `address` (None: start a local Ray).

    A cluster addressed on loopback registered its nodes there, so this process must look for its local raylet there
    too: Ray otherwise rewrites 127.0.0.1 to the machine's network address and finds no raylet (ray-project/ray#59110).
    """
    host = (address or "").rsplit(":", 1)[0]
    loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    return {"address": address, **loopback}
