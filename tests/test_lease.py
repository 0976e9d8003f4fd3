"""The storage lease: one holder at a time, renewed while held, expiring when its holder dies."""

from __future__ import annotations

import json
import time

import pytest

from freshnet import cli
from freshnet.lease import Lease, LeaseHeld
from freshnet.storage_file import FileStorage


def test_second_holder_is_refused_until_the_first_releases(tmp_path):
    store = FileStorage(tmp_path)
    with Lease(store, "night-run", what="night 1"):
        with pytest.raises(LeaseHeld, match="night 1"):
            Lease(store, "night-run", what="night 2").acquire()
    with Lease(store, "night-run", what="night 2") as again:
        assert not again.lost


def test_a_renewed_lease_outlives_its_ttl_and_a_dead_holders_expires(tmp_path):
    store = FileStorage(tmp_path)
    held = Lease(store, "night-run", what="slow night", ttl_s=1.0).acquire()
    time.sleep(2.2)  # more than two TTLs: only renewal keeps it
    with pytest.raises(LeaseHeld):
        Lease(store, "night-run", ttl_s=1.0).acquire()
    # The holder dies: its thread stops renewing, nothing is released.
    held._stop.set()
    held._thread.join()
    time.sleep(1.2)
    taker = Lease(store, "night-run", what="next night", ttl_s=1.0).acquire()
    try:
        assert json.loads(store.read_pointer("lease-night-run")[0])["what"] == "next night"
        # The dead holder's late release must not free the new holder's lease.
        held.release()
        with pytest.raises(LeaseHeld, match="next night"):
            Lease(store, "night-run").acquire()
    finally:
        taker.release()


def test_second_embedded_run_says_at_once_that_a_night_is_running(tmp_path, capsys):
    store_dir = tmp_path / "store"
    config = tmp_path / "c.toml"
    config.write_text(f'classes = ["a", "b"]\nstorage = "file://{store_dir}"\n')
    with Lease(FileStorage(store_dir), "night-run", what="`freshnet run` of other.toml"):
        t0 = time.monotonic()
        code = cli.main(["run", "--config", str(config), "--night", "1"])
        took = time.monotonic() - t0
    assert code == cli.EXIT_BUSY
    err = capsys.readouterr().err
    assert "other.toml" in err and "busy" in err, err
    assert took < 5, f"the second run should stop before doing any work ({took:.1f} s)"
    assert not (store_dir / "nights").exists(), "the refused run must not have started the night"
