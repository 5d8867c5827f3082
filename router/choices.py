"""A request's choices run side by side: their outputs merged into one stream, tagged with the choice's index.

Each choice is its own generation (router/generation.py), started together; the first choice of each prompt is
the one whose prompt KV the others fork. Closing the merged stream (client gone, or an error in one choice)
closes every choice, which aborts them on their workers. best_of: the candidates with the highest cumulative
logprob are kept (`best`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from router.generation import Output
from router.job import GenerationJob

_END = object()


@dataclass
class ChoiceResult:
    """Everything one choice produced (non-streaming)."""

    job: GenerationJob
    outputs: list[Output] = field(default_factory=list)

    @property
    def merged(self) -> Output:
        outs = self.outputs
        return Output(token_ids=[t for o in outs for t in o.token_ids], logprobs=[lp for o in outs for lp in o.logprobs],
                      text="".join(o.text for o in outs), finish_reason=outs[-1].finish_reason if outs else None)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for o in self.outputs for lp in o.logprobs)


async def merged(jobs: list[GenerationJob], run: Callable[[GenerationJob], AsyncIterator[Output]]
                 ) -> AsyncIterator[tuple[GenerationJob, Output]]:
    """(job, output) pairs of every job's generation as they arrive. The first error raised by any choice is
    raised here, after the others are closed."""
    if len(jobs) == 1:
        job = jobs[0]
        async with contextlib.aclosing(run(job)) as outputs:  # type: ignore[type-var]
            async for out in outputs:
                yield job, out
        return
    queue: asyncio.Queue[tuple[GenerationJob, object]] = asyncio.Queue()

    async def pump(job: GenerationJob) -> None:
        try:
            async with contextlib.aclosing(run(job)) as outputs:  # type: ignore[type-var]
                async for out in outputs:
                    queue.put_nowait((job, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((job, e))
        queue.put_nowait((job, _END))

    tasks = [asyncio.create_task(pump(job), name=f"choice-{job.request_id}") for job in jobs]
    try:
        running = len(tasks)
        while running:
            job, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                assert isinstance(item, Output)
                yield job, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(jobs: list[GenerationJob], run: Callable[[GenerationJob], AsyncIterator[Output]]
                  ) -> list[ChoiceResult]:
    results = {job.index: ChoiceResult(job) for job in jobs}
    async with contextlib.aclosing(merged(jobs, run)) as outputs:  # type: ignore[type-var]
        async for job, out in outputs:
            results[job.index].outputs.append(out)
    return [results[job.index] for job in jobs]


def best(results: list[ChoiceResult], best_of: int, n: int) -> list[ChoiceResult]:
    """Per prompt (consecutive groups of `best_of`), the `n` candidates with the highest cumulative logprob, in
    that order (all of them, in order, when best_of == n)."""
    if best_of == n:
        return results
    out = []
    for start in range(0, len(results), best_of):
        group = results[start:start + best_of]
        out += sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
    return out
