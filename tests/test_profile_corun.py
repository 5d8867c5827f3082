"""disagg profile's engine co-runner (benchmarks/profile_corun.py): a second process running this engine's other-role
steps beside the one being timed, started and stopped around a measurement, in the profile's core share."""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.profile_corun import busy_beside, co_runner_args, shape
from benchmarks.profiler import core_share
from engine.cpu_threads import SHARE_ENV

pytestmark = pytest.mark.slow  # two real SmolLM2 engine processes, ~25 s


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_the_engine_co_runner_runs_its_role_in_the_profiles_core_share(role: str, tmp_path) -> None:  # noqa: ANN001
    from benchmarks.machine_load import process_cpu_s

    with core_share(True):
        share = os.environ[SHARE_ENV]
        with busy_beside(False, ["--out", str(tmp_path / "p.json")], role) as proc:
            cpu0 = process_cpu_s(proc.pid)
            time.sleep(2.0)
            assert proc.poll() is None and process_cpu_s(proc.pid) - cpu0 > 0.5  # it is stepping
            assert os.path.exists(share)  # the co-runner joined the share (its engine made the file)
        assert proc.poll() is not None  # stopped with the block
    assert SHARE_ENV not in os.environ and not os.path.exists(share)


def test_the_co_runners_kv_cache_holds_its_role_not_the_profiles_budget() -> None:
    """On a GPU the co-runner is a second engine beside the first's KV budget: it gets only what its steps hold."""
    from benchmarks.profiler import build_engine, parse

    a = parse(["--dummy", "tiny", "--kv-gib", "0.5", "--out", "unused.json"])
    eng, _ = build_engine(a)
    args = co_runner_args(a.argv, eng, "cpu")
    co = parse(args)
    assert co.kv_gib < a.kv_gib and args[: len(a.argv)] == a.argv
    co_eng, _ = build_engine(co)
    n, batch, ctx = shape("cpu")
    held = co_eng.num_kv_blocks * co_eng.config.cache.block_size
    assert held >= max(n, batch * (ctx + 256))
