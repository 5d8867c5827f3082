"""engine.cpu_threads: a CPU engine's thread count follows the cores the rest of the machine leaves idle; the
thread count changes float32 results only in summation order (greedy tokens stay the same)."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.config import ConfigError, EngineConfig
from engine.cpu_threads import CpuThreads, cpu_threads_for, machine_busy_seconds, threads_for
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
