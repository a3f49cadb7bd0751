"""The benchmarks in perf/ still run and produce their figures (a few iterations each).

Asserts that each script runs and reports the named figures with sane values — not
how fast anything is (speed is measured by running the scripts, never by tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.guest


def bench(script: str, *args: str, timeout: float = 600) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "perf" / script), "--json", *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ceiling_runs() -> None:
    f = bench("ceiling.py", "--rounds", "3", "--per-round", "3")
    assert 15e6 < f["region_bytes"] < 30e6
    assert 0 < f["fast_vs_raw"] <= 2 and f["slow_path_ms"] > 0
    assert f["keyed_gbps"] > 0 and f["keyed_every_s"] == 300
    # The fast path's floor is its seeded passes and its keyed share, weighted: it lies
    # between the two. (Seeded xxh3 costs what raw does, so the floor may read < 1.)
    assert f["seeded_vs_raw"] < f["floor_vs_raw"] < f["keyed_vs_raw"]
    # (keyed costs more than seeded in the same alternation, above; the pass figures come
    # from different alternations, so they are only checked to be there)
    assert f["keyed_share"] == 6 / 300 and f["keyed_pass_ms"] > 0 and f["plain_pass_ms"] > 0


def test_vs_qemu_runs() -> None:
    f = bench("vs_qemu.py", "--rounds", "1")
    assert f["speedup_vs_pmemsave"] > 0 and f["speedup_vs_dump"] > 0
    assert f["dump_ms"] > f["kscan_fast_ms"] > 0


def test_live_pass_runs() -> None:
    f = bench("live_pass.py", "--smp", "2", "--rounds", "2", "--per-block", "5")
    assert f["vcpus"] == 2 and 15e6 < f["region_bytes"] < 30e6
    # The parts add up: the register refresh holds the parse, the pass holds both parts.
    assert 0 < f["parse_us"] < f["registers_us"] < f["live_pass_us"]
    assert f["live_pass_us"] == pytest.approx(f["registers_us"] + f["check_us"])
    assert f["pass_vs_hash"] > f["check_vs_hash"] > 0 and 0 < f["registers_share"] < 1


def test_scale_runs(tmp_path: Path) -> None:
    f = bench("scale.py", "--points", "3,6", "--distinct", "2", "--tampers", "2",
              "--in-flight", "2", "--window", "6", "--plot", str(tmp_path / "s.png"),
              "--work", str(tmp_path / "scale"), "--settle", "20")
    assert f["replayed"] is True
    assert [p["vms"] for p in f["points"]] == [3, 6]
    for p in f["points"]:
        assert {"vms", "sweep_cpu_s", "latency_p99_s", "uss_mb"} <= p.keys()
        assert p["sweep_cpu_s"] > 0 and p["latency_p99_s"] > 0 and p["uss_mb"] > 10
        # A 6 s window holds a stats event (every 5 s): the checks' share is known.
        assert 0 < p["sweep_in_scans_cpu_s"] <= p["sweep_cpu_s"]
        assert 0 < p["floor_sweep_cpu_s"] < p["keyed_floor_sweep_cpu_s"]
        assert p["sweep_vs_floor"] > 0 and p["sweep_vs_keyed_floor"] > 0
        assert p["floor_period_s"] > 0 and p["p99_vs_floor_period"] > 0
        # The floor at the budget: the same raw pass, paced over kscan's period.
        assert p["floor_budget_interval_s"] == p["period_s"] > 0
        assert p["floor_budget_batch"] >= 1 and p["floor_budget_sweep_cpu_s"] > 0
        assert p["sweep_vs_budget_floor"] > 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_overhead_runs(tmp_path: Path) -> None:
    """kscan and the floor take turns: kscan stopped while the floor runs, and its
    passes counted between stats events."""
    f = bench("overhead.py", "--vms", "4", "--distinct", "2", "--rounds", "2",
              "--window", "4", "--settle", "20", "--work", str(tmp_path / "ov"))
    assert f["replayed"] is True and f["vms"] == 4 and len(f["rounds"]) == 2
    for r in f["rounds"]:
        assert r["passes"] > 0 and r["kscan_ms"] > 0 and r["interval_s"] > 0
        assert r["floor_ms"] > 0 and r["floor_paced_ms"] > 0 and r["batch"] >= 1
    assert f["keyed_vs_raw"] > 1  # the keyed construction costs more than raw xxh3
    assert f["overhead"] > 0 and f["pacing"] > 0 and f["kscan_vs_floor"] > 0
    assert f["cool"] is False and f["around_ms_per_pass"] >= 0
    assert 0 < f["in_pass_ms_per_pass"] <= f["kscan_ms_per_pass"]
    assert not (tmp_path / "ov").exists()  # the fleet is removed unless --keep


def test_pacer_batch_follows_the_budget() -> None:
    from perf.scale import pacer_batch
    from scanner.run.pacer import BATCH_CPU, TICK

    assert pacer_batch(10, 0.001) == round(TICK * 0.1 / 0.001)
    assert pacer_batch(100, 0.001) == round(BATCH_CPU / 0.001)  # at most BATCH_CPU
    assert pacer_batch(10, 1.0) == 1


def test_soak_runs(tmp_path: Path) -> None:
    f = bench("soak.py", "--minutes", "0.5", "--vms", "4", "--distinct", "2", "--every", "2",
              "--sample", "5", "--warmup", "10", "--max-growth", "1000",
              "--work", str(tmp_path / "soak"))
    assert f["ok"] is True and not f["missed"] and not f["false_alarms"]
    assert f["tampers_detected"] >= 1 and f["churn"]["reboot"] >= 1
    assert f["uss_start_mb"] > 10 and f["uss_end_mb"] > 10 and f["gone_vm_mappings"] == 0


def test_events_runs() -> None:
    f = bench("events.py", "--events", "2000", "--rounds", "1")
    assert f["events_per_s"] > 0 and f["writer_vs_bare"] > 0


def test_startup_runs(tmp_path: Path) -> None:
    f = bench("startup.py", "--vms", "4", "--distinct", "2", "--work", str(tmp_path / "st"))
    assert f["vms"] == 4 and f["cold_s"] > 0 and f["warm_s"] > 0
    assert f["warm_resumed"] == 4  # the restart resumed every VM from its persisted state


def test_scale_refuses_a_fleet_the_memory_cannot_hold(tmp_path: Path) -> None:
    """A fleet that does not fit would measure the disk (or the OOM killer), not kscan:
    perf/scale.py says so before it copies anything, and a fleet that fits passes."""
    import psutil

    from perf.scale import fleet_fits

    rec = tmp_path / "rec0"
    rec.mkdir()
    (rec / "mem").write_bytes(b"\1" * (1 << 20))   # 1 MiB populated
    (rec / "vm.json").write_text("{}")
    avail = psutil.virtual_memory().available
    too_many = int(avail / (1 << 20)) + 10
    assert fleet_fits([rec], 4, tmp_path / "work") is None
    disk = fleet_fits([rec], too_many, tmp_path / "work")
    assert disk is not None and f"{too_many} VMs" in disk  # (tmpfs or disk, as /tmp is)
    if Path("/dev/shm").is_dir():
        shm = fleet_fits([rec], too_many, Path("/dev/shm/kscan-test-fits"))
        assert shm is not None and "available" in shm and "page cache" not in shm
