"""engine.cpu_threads: a CPU engine's thread count follows the cores the rest of the machine leaves idle and, with a
share, the other engine processes' busy flags between layers; the thread count changes float32 results only in
summation order (greedy tokens stay the same)."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from engine import cpu_threads
from engine.config import ConfigError, EngineConfig
from engine.cpu_threads import SHARE_ENV, SLOTS, CoreShare, CpuThreads, cpu_threads_for, machine_busy_seconds, threads_for
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.request import SamplingParams


@pytest.fixture(autouse=True)
def _keep_thread_count():  # noqa: ANN202
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_threads_for_takes_idle_cores() -> None:
    assert threads_for(2, 0.0, 1) == 2
    assert threads_for(2, 0.25, 1) == 2  # a router relaying a few tokens leaves the core idle enough
    assert threads_for(2, 0.5, 1) == 1
    assert threads_for(2, 1.0, 1) == 1
    assert threads_for(2, 3.0, 1) == 1  # never below the fixed share
    assert threads_for(16, 8.0, 8) == 8
    assert threads_for(16, 2.0, 8) == 14
    assert threads_for(2, 0.0, 1, busy_peers=1) == 1  # the other worker has work: half each
    assert threads_for(16, 2.0, 4, busy_peers=1) == 7  # the cores the router leaves, split
    assert threads_for(16, 0.0, 4, busy_peers=5) == 4  # never below the fixed share


class FakeMachine:
    """/proc readings under the test's control: others' and our own busy CPU-seconds at a clock."""

    def __init__(self) -> None:
        self.now = self.others = self.own = 0.0

    def run(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.now += seconds
        self.others += seconds * others_cores
        self.own += seconds * own_cores

    def sample(self) -> tuple[float, float, float]:
        return self.now, self.others + self.own, self.own


def test_adaptive_threads_follow_the_other_workers_load() -> None:
    m = FakeMachine()
    torch.set_num_threads(1)
    t = CpuThreads(floor=1, cores=2, period_s=0.1, sample=m.sample, clock=lambda: m.now)
    assert t.apply() == 1  # nothing measured yet: the fixed share
    m.run(0.2, others_cores=0.05, own_cores=1.0)  # the other worker idle, this one busy
    assert t.apply() == 2 and torch.get_num_threads() == 2
    m.run(0.05, others_cores=1.0, own_cores=2.0)  # inside one period: no new decision
    assert t.apply() == 2
    m.run(0.1, others_cores=1.0, own_cores=1.0)  # the other worker woke up: give its core back
    assert t.apply() == 1 and torch.get_num_threads() == 1
    assert t.changes == 2


def test_fixed_threads_never_read_the_machine() -> None:
    calls = []
    t = CpuThreads(floor=1, cores=1, sample=lambda: calls.append(1) or (0.0, 0.0, 0.0))
    assert [t.apply() for _ in range(3)] == [1, 1, 1] and len(calls) == 1


def test_policy_from_config() -> None:
    cpu = torch.device("cpu")
    assert cpu_threads_for(EngineConfig(cpu_threads=3), cpu).apply() == 3
    assert isinstance(cpu_threads_for(EngineConfig(), cpu), CpuThreads)
    assert cpu_threads_for(EngineConfig(), torch.device("cuda")) is None
    assert cpu_threads_for(EngineConfig(tensor_parallel_size=2), cpu) is None
    for bad in (0, "auto", True, 1.5):
        with pytest.raises(ConfigError, match="cpu_threads"):
            EngineConfig(cpu_threads=bad)
    for bad in ("cores", 3, None):
        with pytest.raises(ConfigError, match="cpu_share"):
            EngineConfig(cpu_share=bad)
    with pytest.raises(ConfigError, match="cpu_share needs"):
        EngineConfig(cpu_share="/dev/shm/x", cpu_threads=2)


def test_machine_busy_seconds_counts_a_busy_thread() -> None:
    before = machine_busy_seconds()
    end = threading.Event()
    threading.Timer(0.3, end.set).start()
    while not end.is_set():
        pass
    assert machine_busy_seconds() - before >= 0.2


def test_engine_reports_its_thread_count(tiny_llama_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cpu_threads=1))
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.cpu_threads == 1 and engine.load() is not None


@pytest.mark.slow
def test_thread_count_keeps_smollm2_greedy_output() -> None:
    """The premise of adaptive threads: the real SmolLM2's greedy tokens are the same at one and two threads, and
    its logprobs differ only by summation order (a batch of three prompts of different lengths, fresh engines so
    that no prefix-cache hit changes how a prompt is computed)."""
    prompts = ["The river runs through the old town, past the mill and the market square. " * 8,
               "What is the capital of France?", "def fib(n):"]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2)
    runs = []
    for n in (1, 2):
        llm = LLM("smollm2", cpu_threads=n)
        runs.append(llm.generate(prompts, params))
        assert llm.engine.stats.cpu_threads == n
    for one, two in zip(*runs, strict=True):
        assert one.token_ids == two.token_ids
        assert [lp[0] for lp in one.outputs[0].logprobs] == pytest.approx(
            [lp[0] for lp in two.outputs[0].logprobs], abs=1e-4)


# ---- the share between engine processes ---------------------------------------------------------------------------
@pytest.fixture
def share_path(tmp_path) -> str:  # noqa: ANN001
    return str(tmp_path / "cores")


def test_slots_are_claimed_and_released(share_path: str) -> None:
    a, b = CoreShare(share_path), CoreShare(share_path)
    assert (a.slot, b.slot) == (0, 1)
    b.set_busy(True)
    assert a.poll() == 1 and b.poll() == 0  # a process is not its own peer
    b.close()
    assert a.poll() == 0
    c = CoreShare(share_path)
    assert c.slot == 1 and a.poll() == 0  # the freed slot, claimed idle
    others = [CoreShare(share_path) for _ in range(SLOTS - 2)]
    with pytest.raises(RuntimeError, match="slots"):
        CoreShare(share_path)
    for s in others:
        s.close()


def test_stale_heartbeat_counts_idle(share_path: str) -> None:
    now = [0.0]
    me, peer = CoreShare(share_path, clock=lambda: now[0]), CoreShare(share_path, clock=lambda: now[0])
    peer.set_busy(True)
    now[0] = 0.9
    assert me.poll() == 1
    now[0] = 1.1  # the peer's step thread has not come by for a second: stopped or hung
    assert me.poll() == 0
    peer.poll()
    assert me.poll() == 1


def _claim_busy_and_die(path: str) -> None:
    CoreShare(path).set_busy(True)
    os._exit(0)  # as kill -9: no release


def test_dead_pid_counts_idle_and_its_slot_is_reclaimed(share_path: str) -> None:
    me = CoreShare(share_path)
    child = multiprocessing.get_context("fork").Process(target=_claim_busy_and_die, args=(share_path,))
    child.start()
    child.join()
    assert me.poll() == 0  # busy, heartbeat fresh, but its pid is gone
    assert CoreShare(share_path).slot == 1


def _peer_process(path: str, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
    share = CoreShare(path)
    for cmd in iter(conn.recv, "stop"):
        if cmd in ("busy", "idle"):
            share.set_busy(cmd == "busy")
        conn.send(share.poll())
    share.close()


def test_two_processes_see_each_others_busy_flag(share_path: str) -> None:
    me = CoreShare(share_path)
    ctx = multiprocessing.get_context("fork")
    conn, child_conn = ctx.Pipe()
    peer = ctx.Process(target=_peer_process, args=(share_path, child_conn))
    peer.start()
    try:
        conn.send("busy")
        assert conn.recv() == 0 and me.poll() == 1
        me.set_busy(True)
        conn.send("poll")
        assert conn.recv() == 1
        conn.send("idle")
        conn.recv()
        assert me.poll() == 0
        conn.send("stop")
        peer.join(10)
        assert peer.exitcode == 0
    finally:
        peer.kill()


class Layer(nn.Module):
    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(x, torch.Tensor)  # the share's pre-hook leaves the arguments alone
        self.seen.append(torch.get_num_threads())
        return x + 1


def test_pre_hook_gives_cores_back_mid_forward(share_path: str) -> None:
    """A peer that wakes while this engine's forward runs on both cores gets one back at the next layer, and the
    engine takes it again at the layer after the peer goes idle."""
    m, seen = FakeMachine(), []
    peer = CoreShare(share_path)
    t = CpuThreads(floor=1, cores=2, period_s=0.1, sample=m.sample, clock=lambda: m.now, share=CoreShare(share_path))
    layers = nn.Sequential(*(Layer(seen) for _ in range(4)))
    t.attach(list(layers))
    flips = iter([True, False])
    layers[2].register_forward_pre_hook(lambda _m, _a: peer.set_busy(next(flips)))  # after the share's hook
    m.run(0.2, others_cores=0.05, own_cores=0.0)
    assert t.apply() == 2
    layers(torch.zeros(1))  # the peer wakes during layer 2
    assert seen == [2, 2, 2, 1]
    layers(torch.zeros(1))  # and goes idle during layer 2 of the next forward: its core comes back
    assert seen[4:] == [1, 1, 1, 2]


def test_peers_cpu_is_not_outside_load(share_path: str) -> None:
    """The machine's busy time less the peers' published CPU: an idle peer that just ran does not hold cores."""
    m, peer_cpu = FakeMachine(), [0.0]
    peer = CoreShare(share_path, cpu=lambda: peer_cpu[0])
    t = CpuThreads(floor=1, cores=2, period_s=0.1, sample=m.sample, clock=lambda: m.now, share=CoreShare(share_path))
    m.run(0.2, others_cores=1.0, own_cores=1.0)
    peer_cpu[0] = 0.2
    peer.set_busy(False)  # it ran one core for the period, then went idle
    assert t.apply() == 2


def test_engine_marks_busy_and_polls_on_its_step_thread(tiny_llama_dir: str, share_path: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring in LLMEngine: busy while it has work, idle after; a pre-hook per layer, run on the thread that runs
    step() (as the worker's executor does); greedy tokens as without a share, though the threads change mid-step."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(cpu_threads, "machine_busy_seconds", cpu_threads.own_busy_seconds)  # nothing else runs
    torch.set_num_threads(1)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    plain = LLMEngine(EngineConfig(model=tiny_llama_dir, cpu_threads=1))
    monkeypatch.setenv(SHARE_ENV, share_path)
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir))
    engine._threads.period_s = 0.0
    peer = CoreShare(share_path)
    threads, busy = set(), []
    layers = engine._runner.model.model.layers

    def first_layer(_m: nn.Module, _a: tuple) -> None:
        threads.add(threading.get_ident())
        busy.append(peer.poll())

    layers[0].register_forward_pre_hook(first_layer)
    layers[1].register_forward_pre_hook(lambda _m, _a: peer.set_busy(len(busy) % 2 == 1))
    polls = []
    poll = engine._threads.poll
    monkeypatch.setattr(engine._threads, "poll", lambda: polls.append(1) or poll())
    tokens = []
    for e in (plain, engine):
        e.add_request("r", [5, 6, 7], params)
        with ThreadPoolExecutor(1) as pool:
            out = [o for _ in range(4) for o in pool.submit(e.step).result()]
            step_thread = pool.submit(threading.get_ident).result()
        tokens.append([t for o in out for t in o.new_token_ids])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 4
    assert threads == {step_thread} and busy == [1, 1, 1, 1]
    assert len(polls) == 4 * (1 + len(layers))  # in apply() and before each layer
    assert engine._threads.changes >= 4  # 2 threads, 1 from layer 2 on, 1, 2 from layer 2 on...
    assert peer.poll() == 0  # the request finished: idle
    engine.close()
    assert CoreShare(share_path).slot == 0  # its slot went back
