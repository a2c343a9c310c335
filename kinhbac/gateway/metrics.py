"""The gateway's Prometheus metrics, on a registry of its own (several gateways can share a
process in tests), served as text at /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_P = "kinhbac_gateway_"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.readings_in = Counter(_P + "readings_received", "Readings received in valid frames",
                                   registry=r)
        self.readings_acked = Counter(_P + "readings_acked", "Readings acknowledged to nodes "
                                      "(durable on disk)", registry=r)
        self.readings_duplicate = Counter(_P + "readings_duplicate", "Resent readings "
                                          "acknowledged again but not stored twice", registry=r)
        self.readings_published = Counter(_P + "readings_published", "Readings the broker "
                                           "acknowledged (PUBACK)", registry=r)
        self.readings_dropped = Counter(_P + "readings_dropped", "Queued readings dropped by "
                                        "policy", ["reason"], registry=r)
        self.storage_faults = Counter(_P + "storage_faults", "Queue commits refused by a storage "
                                      "fault, by kind (io_error, disk_full, failed): their "
                                      "frames got BUSY and stay on the nodes", ["kind"],
                                      registry=r)
        self.frames_refused = Counter(_P + "frames_refused", "Frames refused, by reason",
                                      ["reason"], registry=r)
        self.claims = Counter(_P + "claims", "CLAIM frames of boards holding only the site's "
                              "claim key, by outcome (pending, rejected, refused, "
                              "identity_sent)", ["outcome"], registry=r)
        self.queue_depth = Gauge(_P + "queue_depth", "Readings waiting for the broker",
                                 registry=r)
        self.oldest_age = Gauge(_P + "queue_oldest_age_seconds", "Age of the oldest queued "
                                "reading", registry=r)
        self.uplink_up = Gauge(_P + "uplink_connected", "1 while connected to the broker",
                               registry=r)
        self.reconnects = Counter(_P + "uplink_reconnects", "Broker connections started",
                                  registry=r)
        self.connections = Gauge(_P + "node_connections", "Node connections open", registry=r)
        self.commit_seconds = Histogram(
            _P + "commit_seconds", "Time of one group commit (fsync included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on a thread; returns the port it listens on."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        return server.server_address[1]
