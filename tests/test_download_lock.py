"""download_lock: one holder at a time, others wait or time out."""

from __future__ import annotations

import threading
import time

import pytest

from deqrun.data.lock import download_lock


def test_a_second_job_waits_for_the_first_download(tmp_path):
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with download_lock(tmp_path / "data"):
            holding.set()
            time.sleep(0.5)
            (tmp_path / "data" / "files").write_text("done")
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with download_lock(tmp_path / "data", poll_s=0.05):
        order.append("second sees " + (tmp_path / "data" / "files").read_text())
    thread.join()
    assert order == ["first done", "second sees done"]


def test_waiting_too_long_is_a_timeout(tmp_path):
    with download_lock(tmp_path):
        with pytest.raises(TimeoutError, match="still downloading"):
            with download_lock(tmp_path, timeout_s=0.2, poll_s=0.05):
                pass
    with download_lock(tmp_path, timeout_s=0.2):  # released: free again
        pass
