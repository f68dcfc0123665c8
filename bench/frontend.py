"""pyvhost's frontend (``pyvhost gen --mode tx``) next to DPDK's virtio-user (testpmd
``txonly``), both sending 64-byte frames into the same sink in the same run: DPDK's vhost
PMD in ``rxonly``. The rate is what the sink receives (its Rx-pps, median of samples); the
sink forwards on CPU 0, the sender runs on CPU 1. Measured in --rounds alternating rounds
(DPDK, pyvhost, DPDK, ...; each round printed, with the cross-core round trip read before
it). Prints Mpps (medians, each side's spread) and the ratio pyvhost/DPDK, of the medians
and the median of each round's.
``--packed``: both senders use packed rings (gen --packed, virtio-user packed_vq=1).
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rounds import alternate, cross_core, paired  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness.testpmd import Testpmd, vhost_vdev, virtio_user_vdev  # noqa: E402

PY, DPDK = "pyvhost gen --mode tx", "DPDK virtio-user txonly"
SINK_MAIN_LCORE = 1       # the sink forwards on CPU 0
SENDER_CPU = 1
SENDER_MAIN_LCORE = 0     # DPDK's sender forwards on CPU 1


def sink(workdir: Path, sock: Path, name: str) -> Testpmd:
    tp = Testpmd([vhost_vdev(sock)], workdir=workdir, name=name, main_lcore=SINK_MAIN_LCORE)
    tp.start()
    tp.set_fwd("rxonly")
    tp.start_fwd()
    return tp


def measure(tp: Testpmd, seconds: float, samples: int) -> float:
    """Median Rx-pps of the sink over ``samples`` readings ``seconds`` apart, in Mpps."""
    tp.port_stats()
    rates = []
    for _ in range(samples):
        time.sleep(seconds)
        rates.append(tp.port_stats()[0]["rx_pps"])
    return statistics.median(rates) / 1e6


def run_gen(workdir: Path, size: int, seconds: float, samples: int, packed: bool) -> float:
    sock = workdir / "gen.sock"
    tp = sink(workdir, sock, "sink-gen")
    gen = None
    try:
        run_for = seconds * (samples + 2) + 2
        gen = subprocess.Popen(
            ["taskset", "-c", str(SENDER_CPU), sys.executable, "-m", "pyvhost.cli.main", "gen",
             "--socket", str(sock), "--mode", "tx", "--size", str(size), "--duration",
             str(run_for), *(["--packed"] if packed else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tp.wait_link_up()
        time.sleep(1.0)
        rate = measure(tp, seconds, samples)
        if gen.poll() not in (None, 0):
            raise RuntimeError(f"pyvhost gen exited with status {gen.returncode}")
        return rate
    finally:
        if gen is not None:
            gen.terminate()
            gen.wait(10)
        tp.close()


def run_dpdk(workdir: Path, size: int, seconds: float, samples: int, packed: bool) -> float:
    sock = workdir / "dpdk.sock"
    tp = sink(workdir, sock, "sink-dpdk")
    try:
        opts = {"packed_vq": 1} if packed else {}
        sender = Testpmd([virtio_user_vdev(sock, **opts)], workdir=workdir,
                         name="virtio-user-txonly",
                         main_lcore=SENDER_MAIN_LCORE)
        try:
            sender.start()
            sender.wait_link_up()
            sender.set_fwd("txonly")
            sender.cmd(f"set txpkts {size}")
            sender.start_fwd()
            time.sleep(1.0)
            return measure(tp, seconds, samples)
        finally:
            sender.close()
    finally:
        tp.close()


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench frontend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=1.0, help="per sample")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--packed", action="store_true", help="packed rings on both senders")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = ap.parse_args()
    if args.rounds < 1 or args.samples < 1:
        ap.error("--rounds and --samples must be at least 1")
    ring = "packed" if args.packed else "split"
    label = f"{ring} rings, {args.size} B"
    workdir = Path(tempfile.mkdtemp(prefix="pvf", dir="/tmp"))
    t = Table("frontend", "front-ends sending into DPDK vhost rxonly, Mpps at the sink (median)",
              [PY, DPDK], [(PY, DPDK)])
    try:
        def one(run):
            return lambda: run(workdir, args.size, args.seconds, args.samples, args.packed)
        trips: dict[str, list[float | None]] = {}
        rounds = alternate(label, args.rounds, {DPDK: one(run_dpdk), PY: one(run_gen)},
                           probe=cross_core(0, SENDER_CPU), probed=trips)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row = t.add(label, "Mpps", rounds=rounds, round_trips=trips)
    per_round = paired(row.rounds, PY, DPDK)
    if per_round is not None:
        t.notes.append(f"{label}: pyvhost/DPDK median of per-round ratios x{per_round:.2f}")
    emit(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
