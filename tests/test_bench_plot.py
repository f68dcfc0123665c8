"""``pyvhost bench NAME --plot FILE.png``: bench tables (rows, ratios, JSON round trip, bad
files refused with a clear error), the plot is a valid PNG with one panel per unit and the
ratios written on it, and a real (tiny) run of ``bench frontend`` against DPDK writes its
rows and a plot drawn from them."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from pyvhost.cli import benchtable
from pyvhost.cli.benchplot import draw
from pyvhost.cli.benchtable import Table, TableError
from tests.harness import processes


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and IHDR chunk, and that it
    decodes to an image of more than two colours (bars drawn, not a blank page)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image
    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::37]}
    assert len(colours) > 2
    return width, height


def host_like() -> Table:
    t = Table("host", "two namespaces", ["OVS userspace", "pyvhost afpacket"],
              [("pyvhost afpacket", "OVS userspace")])
    t.add("TCP", "Gbit/s", {"OVS userspace": 2.0, "pyvhost afpacket": 3.0})
    t.add("64B sent", "kpps", {"OVS userspace": 400.0, "pyvhost afpacket": 420.0},
          compare=False)
    t.add("64B rcvd", "kpps", {"OVS userspace": 200.0, "pyvhost afpacket": 300.0})
    return t


def test_table_rows_ratios_and_json(tmp_path):
    t = host_like()
    assert [t.ratio(r, t.ratios[0]) for r in t.rows] == [1.5, None, 1.5]
    md = t.markdown()
    assert "| TCP | Gbit/s | 2.000 | 3.000 | x1.50 |" in md and "| 64B sent | kpps | 400.00 " \
        "| 420.00 |  |" in md
    flows = Table("flows", "x", ["pyvhost", "OVS"], [("pyvhost", "OVS")], better_by=True)
    r = flows.add("load", "s", {"pyvhost": 2.0, "OVS": 8.0}, better="lower")
    assert flows.ratio(r, flows.ratios[0]) == 4.0 and "pyvhost better by" in flows.markdown()
    benchtable.save([t, flows], tmp_path / "rows.json")
    back = benchtable.load(tmp_path / "rows.json")
    assert [b.to_json() for b in back] == [t.to_json(), flows.to_json()]
    with pytest.raises(TableError, match="unknown columns"):
        t.add("x", "s", {"nobody": 1.0})


def test_rows_from_alternating_rounds_keep_each_round_and_the_spread(tmp_path):
    t = Table("switch", "loop", ["pyvhost", "OVS"], [("pyvhost", "OVS")])
    r = t.add("64 B", "Mpps", rounds={"pyvhost": [6.0, 10.0, 8.0], "OVS": [5.0, 5.0]})
    assert r.values == {"pyvhost": 8.0, "OVS": 5.0}               # the medians
    assert r.spread("pyvhost") == 0.25 and r.spread("OVS") == 0.0
    one = t.add("1500 B", "Mpps", rounds={"pyvhost": [3.0]}, compare=False)
    assert one.spread("pyvhost") is None and one.values["OVS"] is None
    md = t.markdown()
    assert "| 64 B | Mpps | 8.000 +-25% | 5.000 +-0% | x1.60 |" in md, md
    assert "| 1500 B | Mpps | 3.000 | n/a |" in md and "half the range of the rounds" in md
    benchtable.save([t], tmp_path / "rows.json")
    [back] = benchtable.load(tmp_path / "rows.json")
    assert back.rows[0].rounds == {"pyvhost": [6.0, 10.0, 8.0], "OVS": [5.0, 5.0]}
    assert back.markdown() == md
    notes = draw([back], tmp_path / "rounds.png")                 # whiskers where rounds exist
    assert notes == ["64 B: x1.60"] and png_size(tmp_path / "rounds.png")[0] > 0
    with pytest.raises(TableError, match="not a number"):
        t.add("x", "Mpps", rounds={"pyvhost": ["fast"]})
    with pytest.raises(TableError, match="unknown columns"):
        t.add("x", "Mpps", rounds={"nobody": [1.0]})


@pytest.mark.parametrize("text, why", [("not json", "Expecting value"), ("[]", "not a list"),
                                       ('[{"bench": "x"}]', "not a bench table"),
                                       ('[{"bench": "x", "title": "t", "columns": ["a"], '
                                        '"ratios": [["a", "b"]], "rows": []}]', "ratio a/b"),
                                       ('[{"bench": "x", "title": "t", "columns": ["a"], '
                                        '"ratios": [], "rows": [{"label": "l", "unit": "u", '
                                        '"values": {"a": "fast"}}]}]', "not a number")])
def test_bad_rows_files_are_refused(tmp_path, text, why):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(TableError, match=why):
        benchtable.load(path)
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "switch",
                        "--from-rows", str(path), "--plot", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=60, cwd=processes.REPO)
    assert r.returncode == 2 and "bench:" in r.stderr and not (tmp_path / "x.png").exists()


def test_plot_is_a_png_with_a_panel_per_unit_and_the_ratios(tmp_path):
    t = host_like()
    one = tmp_path / "one.png"
    notes = draw([t], one)
    assert notes == ["TCP: x1.50", "64B rcvd: x1.50"]
    w, h = png_size(one)
    single = Table("switch", "loop", ["pyvhost", "DPDK"], [("pyvhost", "DPDK")])
    single.add("64 B", "Mpps", {"pyvhost": 5.0, "DPDK": 10.0})
    single.add("1500 B", "Mpps", {"pyvhost": 2.0, "DPDK": None})
    assert draw([single], tmp_path / "two.png") == ["64 B: x0.50"]
    w2, h2 = png_size(tmp_path / "two.png")
    assert h > 1.5 * h2                          # two units: two panels; one unit: one
    with pytest.raises(TableError):
        draw([Table("x", "empty", ["a"], [])], tmp_path / "none.png")


def test_plot_cli_from_saved_rows(tmp_path):
    benchtable.save([host_like()], tmp_path / "rows.json")
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "host",
                        "--from-rows", str(tmp_path / "rows.json"), "--plot",
                        str(tmp_path / "p.png")], capture_output=True, text=True, timeout=60,
                       cwd=processes.REPO)
    assert r.returncode == 0, r.stderr
    png_size(tmp_path / "p.png")
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "switch", "--plot",
                        str(tmp_path / "p.jpg")], capture_output=True, text=True, timeout=60,
                       cwd=processes.REPO)
    assert r.returncode == 2 and ".png" in r.stderr


@pytest.mark.slow
def test_a_real_tiny_bench_run_is_plotted(tmp_path):
    """bench frontend (pyvhost gen and DPDK virtio-user into DPDK's vhost sink) with one
    short sample each in two alternating rounds: its rows (and rounds) are saved and the
    plot drawn from them."""
    png, rows = tmp_path / "frontend.png", tmp_path / "frontend.json"
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "frontend",
                        "--plot", str(png), "--rows", str(rows), "--", "--seconds", "0.3",
                        "--samples", "1", "--rounds", "2"], capture_output=True, text=True,
                       timeout=240, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    [table] = benchtable.load(rows)
    assert table.bench == "frontend" and len(table.rows) == 1 and len(table.columns) == 2
    values = table.rows[0].values
    assert all(v > 0 for v in values.values()), values
    assert {c: len(v) for c, v in table.rows[0].rounds.items()} == {c: 2 for c in table.columns}
    assert "round 2/2  split rings, 64 B" in r.stdout
    assert "| split rings, 64 B | Mpps |" in r.stdout
    png_size(png)
    a, b = (values[c] for c in table.ratios[0])
    assert draw([table], tmp_path / "again.png") == [f"split rings, 64 B: x{a / b:.2f}"]
    assert json.loads(rows.read_text())[0]["columns"] == table.columns
