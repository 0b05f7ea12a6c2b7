"""Router replicas that share what they know (issue #22).

Each replica publishes its routing facts (which blocks it sent to which backend, request begin /
first byte / end with their token counts, admin changes) on a ZMQ PUB socket, and applies its
peers' facts as if they were its own: N replicas hold the same approximate index and in-flight
picture up to the propagation delay. The transport follows vLLM's KV events (sequence numbers, a
ROUTER replay socket); the subscriber is `proxy.kv_events.KVEventSubscriber`'s gap/restart/silence
machinery with a different payload and a snapshot for replicas that join late.

- `facts.py`     the wire form of a batch of facts and of a snapshot
- `publisher.py` PUB + ROUTER replay of one replica's batches (ring buffer, snapshot when it rolled past)
- `peer.py`      one peer's stream -> `ReplicaSync`, with gap detection and resync
- `sync.py`      `ReplicaSync`: the router's hooks, batching off the request path, applying peers' facts
- `workers.py`   `--workers N`: N replica processes on one port (SO_REUSEPORT), peers over ipc://

Import from the modules (`proxy.replicas.sync.ReplicaSync`): the package re-exports nothing, so its
modules can import each other without running back through it.
"""
