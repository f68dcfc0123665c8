"""pyvhost's vhost-user back-end next to DPDK's vhost PMD, measured in the same run.

Two directions, each at 64 and 1500 bytes, over split rings and over packed rings
(virtio-user ``packed_vq=1``; ``--rings`` picks):
  to-backend:   DPDK virtio-user `txonly` into `pyvhost reflector --mode sink`
                vs into DPDK's vhost PMD in `rxonly`      (rate: virtio-user Tx-pps)
  from-backend: DPDK virtio-user `rxonly` fed by `pyvhost reflector --mode source`
                vs by DPDK's vhost PMD in `txonly`        (rate: virtio-user Rx-pps)
The virtio-user testpmd forwards on CPU 1; the back-end under test polls on CPU 0. Each row
is measured in --rounds alternating rounds (DPDK, pyvhost, DPDK, ...; each round printed).
Prints Mpps (medians, with each side's spread over the rounds) and the ratio pyvhost/DPDK,
of the medians and (steadier on a machine whose speed drifts) the median of each round's.
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rounds import alternate, cross_core, paired  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402
from tests.harness.testpmd import Testpmd, vhost_vdev, virtio_user_vdev  # noqa: E402

FRONTEND_MAIN_LCORE = 0   # forwards on CPU 1
BACKEND_MAIN_LCORE = 1    # forwards on CPU 0
BACKEND_CPU = 0
FRONTEND_CPU = 1


def measure(tp: Testpmd, key: str, seconds: float, samples: int) -> float:
    """Median of ``samples`` rate readings of ``key`` (pps) over ``seconds`` each."""
    tp.port_stats()
    rates = []
    for _ in range(samples):
        time.sleep(seconds)
        rates.append(tp.port_stats()[0][key])
    return statistics.median(rates) / 1e6


RINGS = {"split": {}, "packed": {"packed_vq": 1}}


def frontend(workdir: Path, sock: Path, mode: str, size: int, mrg: int, ring: str) -> Testpmd:
    tp = Testpmd([virtio_user_vdev(sock, mrg_rxbuf=mrg, **RINGS[ring])], workdir=workdir,
                 name=f"virtio-user-{ring}-{mode}-{size}", main_lcore=FRONTEND_MAIN_LCORE)
    tp.start()
    tp.wait_link_up()
    tp.set_fwd(mode)
    if mode == "txonly":
        tp.cmd(f"set txpkts {size}")
    tp.start_fwd()
    return tp


def run_pyvhost(workdir: Path, direction: str, size: int, seconds, samples, mrg,
                ring) -> float:
    sock = workdir / "pyvhost.sock"
    mode = "sink" if direction == "to-backend" else "source"
    refl = processes.reflector(workdir, sock, mode=mode,
                               extra=["--cpu", str(BACKEND_CPU), "--size", str(size)],
                               name=f"reflector-{mode}-{size}")
    try:
        fmode = "txonly" if direction == "to-backend" else "rxonly"
        tp = frontend(workdir, sock, fmode, size, mrg, ring)
        try:
            return measure(tp, "tx_pps" if fmode == "txonly" else "rx_pps", seconds, samples)
        finally:
            tp.close()
    finally:
        refl.stop()


def run_dpdk(workdir: Path, direction: str, size: int, seconds, samples, mrg, ring) -> float:
    sock = workdir / "dpdk.sock"
    host = Testpmd([vhost_vdev(sock)], workdir=workdir, name=f"vhost-{direction}-{size}",
                   main_lcore=BACKEND_MAIN_LCORE)
    try:
        host.start()
        hmode = "rxonly" if direction == "to-backend" else "txonly"
        host.set_fwd(hmode)
        if hmode == "txonly":
            host.cmd(f"set txpkts {size}")
        fmode = "txonly" if direction == "to-backend" else "rxonly"
        tp = frontend(workdir, sock, fmode, size, mrg, ring)
        try:
            host.wait_link_up()
            host.start_fwd()
            return measure(tp, "tx_pps" if fmode == "txonly" else "rx_pps", seconds, samples)
        finally:
            tp.close()
    finally:
        host.close()


PY, DPDK = "pyvhost", "DPDK vhost"


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench backend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--seconds", type=float, default=2.0, help="per sample")
    ap.add_argument("--samples", type=int, default=3, help="rate readings per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per row")
    ap.add_argument("--mrg-rxbuf", type=int, default=1, choices=(0, 1))
    ap.add_argument("--rings", default="split,packed", help="split, packed or both")
    args = ap.parse_args()
    rings = args.rings.split(",")
    if not rings or any(r not in RINGS for r in rings):
        ap.error(f"--rings: a comma-separated subset of {', '.join(RINGS)}")
    if args.rounds < 1 or args.samples < 1:
        ap.error("--rounds and --samples must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="pvb", dir="/tmp"))
    t = Table("backend", "vhost-user back-ends, Mpps", [PY, DPDK], [(PY, DPDK)])
    try:
        for ring in rings:
            for direction in ("to-backend", "from-backend"):
                for size in (int(s) for s in args.sizes.split(",")):
                    def one(run, ring=ring, direction=direction, size=size):
                        return lambda: run(workdir, direction, size, args.seconds,
                                           args.samples, args.mrg_rxbuf, ring)
                    label = f"{ring} {direction} {size} B"
                    trips: dict[str, list[float | None]] = {}
                    rounds = alternate(label, args.rounds,
                                       {DPDK: one(run_dpdk), PY: one(run_pyvhost)},
                                       probe=cross_core(BACKEND_CPU, FRONTEND_CPU),
                                       probed=trips)
                    row = t.add(label, "Mpps", rounds=rounds, round_trips=trips)
                    ratio = t.ratio(row, t.ratios[0])
                    per_round = paired(row.rounds, PY, DPDK)
                    print(f"{label}: pyvhost {row.values[PY]:6.2f} Mpps  DPDK "
                          f"{row.values[DPDK]:6.2f} Mpps  ratio {ratio or float('nan'):.2f}"
                          f"  per round {per_round or float('nan'):.2f}", flush=True)
                    if per_round is not None:
                        t.notes.append(f"{label}: pyvhost/DPDK median of per-round ratios "
                                       f"x{per_round:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
