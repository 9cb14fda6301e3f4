"""The cluster's part of the status model as metrics and as the status JSON round trip."""

from __future__ import annotations

from pouch_driver.http.schemas import StatusResponse
from pouch_driver.metrics import Metrics
from pouch_driver.service.status import ClusterNetworkView, ClusterView, Status

VIEW = ClusterView(
    host="198.51.100.11",
    store=("http://198.51.100.1:2379",),
    connected=True,
    last_error="",
    hosts=("198.51.100.11", "198.51.100.12"),
    networks=(
        ClusterNetworkView(
            name="mesh",
            network_id="n" * 64,
            vni=5000,
            members=("198.51.100.11", "198.51.100.12"),
            blocks=("10.60.0.0/26",),
            pins=("10.60.200.7",),
            remote_endpoints=3,
        ),
    ),
    store_p50_ms=1.5,
    store_p99_ms=12.0,
    watch_lag_ms=2.5,
)
STATUS = Status(networks=(), endpoints=(), pools=(), pending_deletes=0, cluster=VIEW)


def test_metrics_show_the_session_the_store_latency_and_the_watch_lag() -> None:
    text = Metrics().render(STATUS)
    for line in (
        "pouch_driver_cluster_connected 1",
        "pouch_driver_cluster_hosts 2",
        'pouch_driver_cluster_store_seconds{quantile="0.5"} 0.001500',
        'pouch_driver_cluster_store_seconds{quantile="0.99"} 0.012000',
        "pouch_driver_cluster_watch_lag_seconds 0.002500",
        'pouch_driver_cluster_remote_endpoints{network="mesh"} 3',
    ):
        assert line in text.splitlines(), line
    assert "pouch_driver_cluster" not in Metrics().render(
        Status(networks=(), endpoints=(), pools=(), pending_deletes=0)
    )


def test_status_json_round_trips_the_cluster_view() -> None:
    doc = StatusResponse().dump(STATUS)
    assert doc["Cluster"]["Networks"][0]["Blocks"] == ["10.60.0.0/26"]
    assert StatusResponse().load(doc) == STATUS
    plain = StatusResponse().dump(Status((), (), (), 0))
    assert StatusResponse().load(plain).cluster is None
