"""``pyvhost switch --metrics``: the Prometheus endpoint counts what dump-ports counts (per
port and queue, drops by reason, PMDs, the busiest rules, the build), a real Prometheus
server (Debian's) scrapes it during traffic and its query API returns the port counters
increasing, and bad --metrics values are clear errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.test_flow_table_switch import CONFIG, MAC, udp

PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(metric sample name, frozenset of labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, str(x)) in ls for k, x in labels.items()))


@pytest.fixture
def metered(workdir):
    port = free_port()
    with switch_with_ports(workdir, CONFIG, "ab", extra=["--metrics", f"127.0.0.1:{port}"]) \
            as (run_dir, ports):
        yield run_dir, ports, port


def test_metrics_count_what_dump_ports_counts(metered):
    run_dir, ports, mport = metered
    processes.ctl(run_dir, "add-flow", "br0", "priority=9,in_port=a,actions=output:b")
    frame = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")
    ports["a"].send_all([frame] * 100, timeout=5)
    assert len(drain(ports["b"])) == 100
    samples = scrape(mport)
    dp = json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))
    assert value(samples, "pyvhost_port_rx_packets_total", bridge="br0", port="a") == \
        dp["a"]["datapath"]["rx_packets"] == 100
    assert value(samples, "pyvhost_port_tx_packets_total", bridge="br0", port="b") == 100
    assert value(samples, "pyvhost_port_rx_bytes_total", port="a", queue="0") == \
        dp["a"]["datapath"]["rx_bytes"]
    assert value(samples, "pyvhost_port_drops_total", port="a", reason="upcall") == 0
    assert ("pyvhost_port_drops_total", frozenset({"bridge": "br0", "port": "b",
            "queue": "all", "reason": "tx_full"}.items())) in samples
    assert value(samples, "pyvhost_rule_packets_total", bridge="br0",
                 rule="priority=9,in_port=a,actions=output:b") == 100
    assert value(samples, "pyvhost_pmd_packets_total") >= 100
    assert value(samples, "pyvhost_pmd_busy_seconds_total") > 0
    # one flow: each PMD asks its exact-match cache (the gauge is there, at 0 for each)
    skipping = [v for (n, _ls), v in samples.items() if n == "pyvhost_pmd_emc_skipping"]
    assert skipping and not any(skipping), samples
    assert value(samples, "pyvhost_pmd_emc_skipped_total") == 0
    assert value(samples, "pyvhost_build_info") == 1
    ports["a"].send_all([frame] * 50, timeout=5)
    assert len(drain(ports["b"])) == 50
    assert value(scrape(mport), "pyvhost_port_rx_packets_total", port="a") == 150


@pytest.mark.parametrize("bad, why", [("nonsense", "ADDRESS:PORT"), ("127.0.0.1:99999",
                                                                       "ADDRESS:PORT"),
                                      ("127.0.0.1:{busy}", "in use")])
def test_bad_metrics_address_is_a_clear_error(workdir, bad, why):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        bad = bad.format(busy=busy.getsockname()[1])
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "switch", "--run-dir",
                            str(workdir / "run"), "--metrics", bad], capture_output=True,
                           text=True, timeout=60, cwd=processes.REPO)
    assert r.returncode == 2 and why in r.stderr, r.stderr


@pytest.mark.slow
def test_prometheus_scrapes_the_switch_during_traffic(metered, workdir):
    """Debian's Prometheus scrapes the endpoint every second while a sends to b; its query
    API returns a's receive counter, and later a larger one (polled, no fixed sleeps)."""
    run_dir, ports, mport = metered
    web = free_port()
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: pyvhost\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{mport}']\n")
    log = open(workdir / "prometheus.log", "wb")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    query = "http://127.0.0.1:{}/api/v1/query?query={}".format(web, urllib.parse.quote(
        'sum(pyvhost_port_rx_packets_total{bridge="br0",port="a"})'))
    frame = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")
    seen: list[float] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ports["a"].send_all([frame] * 20, timeout=5)
            drain(ports["b"], 0.05)
            try:
                with urllib.request.urlopen(query, timeout=5) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                result = []                            # not up yet
            if result:
                v = float(result[0]["value"][1])
                if not seen or v != seen[-1]:
                    seen.append(v)
                if len(seen) >= 2:
                    break
            time.sleep(0.3)
        assert len(seen) >= 2 and seen[1] > seen[0] > 0, (seen, log.name)
    finally:
        prom.terminate()
        try:
            prom.wait(20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()
