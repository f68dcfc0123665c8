"""Prometheus metrics of a running switch (``pyvhost switch --metrics ADDR:PORT``), served by
prometheus_client's HTTP server on its own thread. Every scrape reads the counters as they
are: the datapath's per-port counters and the rings' (or host devices') per-queue ones,
the PMDs' busy and idle time, upcalls and cache hits, the rules that counted the most
packets, and the build. Nothing here takes a lock a PMD waits for (counters are read
without locks; the classifier's read lock is shared with PMD lookups), and a scrape never
changes anything. Knows the Switch's read side only; no commands, no store writes.
"""

from __future__ import annotations

import logging
from importlib import metadata

log = logging.getLogger("pyvhost.switch")
TOP_RULES = 10                   # rules with their own packet counter series
PORT_LABELS = ["bridge", "port", "queue"]


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` too) as (address, port); ValueError if it is not one."""
    addr, sep, port = text.rpartition(":")
    if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: give ADDRESS:PORT, e.g. 127.0.0.1:9100")
    return addr.strip("[]"), int(port)


def _version() -> str:
    try:
        return metadata.version("pyvhost")
    except metadata.PackageNotFoundError:
        return "unknown"


class SwitchCollector:
    """A prometheus_client collector over one Switch."""

    def __init__(self, switch):
        self.switch = switch

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )
        fams = {name: CounterMetricFamily(f"pyvhost_port_{name}", help_, labels=PORT_LABELS)
                for name, help_ in (("rx_packets", "Frames received from the port"),
                                    ("rx_bytes", "Bytes received from the port"),
                                    ("tx_packets", "Frames sent to the port"),
                                    ("tx_bytes", "Bytes sent to the port"))}
        drops = CounterMetricFamily("pyvhost_port_drops", "Frames dropped, by reason",
                                    labels=[*PORT_LABELS, "reason"])
        for port in list(self.switch.ports.values()):
            try:
                self._port(port, fams, drops)
            except Exception as e:                     # a port going away mid-scrape
                log.debug("metrics: port %s skipped: %s", port.name, e)
        yield from fams.values()
        yield drops
        yield from self._pmds(GaugeMetricFamily, CounterMetricFamily)
        yield self._rules(CounterMetricFamily)
        info = InfoMetricFamily("pyvhost_build", "The running pyvhost")
        info.add_metric([], {"version": _version()})
        yield info

    def _port(self, port, fams, drops) -> None:
        c = self.switch.port_counters(port)
        d = c["datapath"]
        queues = c["queues"]
        if queues:                                     # vhost-user: per queue, from rings
            for q in queues:
                labels = [port.bridge, port.name, str(q["queue"])]
                fams["rx_packets"].add_metric(labels, q["rx"]["packets"])
                fams["rx_bytes"].add_metric(labels, q["rx"]["bytes"])
                fams["tx_packets"].add_metric(labels, q["tx"]["packets"])
                fams["tx_bytes"].add_metric(labels, q["tx"]["bytes"])
                for side in ("rx", "tx"):
                    for k, v in q[side].items():
                        if k.startswith("drop_"):
                            drops.add_metric([*labels, f"{side}_{k[5:]}"], v)
        else:                                          # one queue: the datapath's counts
            labels = [port.bridge, port.name, "0"]
            for name in fams:
                fams[name].add_metric(labels, d[name])
            for side, counters in (("rx", c["rx_rings"]), ("tx", c["tx_rings"])):
                for k, v in counters.items():
                    if k.startswith("drop_"):
                        drops.add_metric([*labels, f"{side}_{k[5:]}"], v)
        for k, v in d.items():                         # the datapath's, for the whole port
            if k.startswith("drop_"):
                drops.add_metric([port.bridge, port.name, "all", k[5:]], v)

    def _pmds(self, gauge, counter):
        busy = counter("pyvhost_pmd_busy_seconds", "PMD time spent on frames", labels=["pmd"])
        idle = counter("pyvhost_pmd_idle_seconds", "PMD time spent polling empty queues",
                       labels=["pmd"])
        fams = {k: counter(f"pyvhost_pmd_{k}", help_, labels=["pmd"]) for k, help_ in (
            ("packets", "Frames the PMD received"), ("upcalls", "Cache misses looked up"),
            ("upcall_drops", "Misses dropped (no decision)"),
            ("upcall_throttled", "Misses dropped: the port was over its share"),
            ("emc_hits", "Exact-match cache hits"), ("megaflow_hits", "Megaflow cache hits"),
            ("simple_match_hits", "Of the megaflow hits, frames a burst's port-wide "
             "megaflow decided (one lookup per burst)"),
            ("megaflow_reused", "Of the megaflow hits, frames under the megaflow of the "
             "frame before them (no lookup of their own)"),
            ("emc_skipped", "Frames not asked of the exact-match cache (it lost most lookups)"))}
        flows = gauge("pyvhost_pmd_megaflows", "Megaflow cache entries", labels=["pmd"])
        skipping = gauge("pyvhost_pmd_emc_skipping", "1 while the exact-match cache is "
                         "skipped (it lost most lookups to other flows, or "
                         "emc-insert-inv-prob=0 turned it off)", labels=["pmd"])
        for i, pmd in enumerate(list(self.switch.pmds.pmds)):
            s = pmd.stats()
            busy.add_metric([str(i)], s["busy_ns"] / 1e9)
            idle.add_metric([str(i)], s["idle_ns"] / 1e9)
            for k, fam in fams.items():
                fam.add_metric([str(i)], s[k])
            flows.add_metric([str(i)], s["megaflows"])
            skipping.add_metric([str(i)], int(s["emc_skipping"]))
        yield busy
        yield idle
        yield from fams.values()
        yield flows
        yield skipping

    def _rules(self, counter):
        fam = counter("pyvhost_rule_packets", f"Packets of the {TOP_RULES} busiest rules of "
                      "each bridge", labels=["bridge", "rule"])
        for name in list(self.switch.bridges):
            try:
                rows = self.switch.top_flows_data(name, TOP_RULES)
            except Exception as e:                     # the bridge went away mid-scrape
                log.debug("metrics: bridge %s skipped: %s", name, e)
                continue
            for r in rows:
                fam.add_metric([name, r["flow"]], r["n_packets"])
        return fam


class MetricsServer:
    """The HTTP endpoint: ``start()`` binds it (OSError if it cannot), ``stop()`` ends it."""

    def __init__(self, switch, address: str):
        self.switch = switch
        self.addr, self.port = parse_address(address)
        self.server = None
        self.thread = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SwitchCollector(self.switch))
        self.server, self.thread = start_http_server(self.port, self.addr, registry=registry)
        log.info("metrics: serving on %s:%d", self.addr, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None
