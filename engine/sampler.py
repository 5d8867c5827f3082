"""Turn a batch of logits into next tokens, vLLM order.

0. a structured-output row's grammar mask (engine/grammar.py): disallowed tokens at -inf;
1. logprobs from those logits (log_softmax before any other processing);
2. vLLM's request rules (engine/logits_processors.py): allowed_token_ids, bad words, min_tokens, logit_bias;
3. penalties: repetition (CTRL style, prompt + output), frequency and presence (OpenAI, output only);
4. greedy rows (temperature 0) take the argmax;
5. other rows: temperature, top-k, top-p, min-p, then an exponential race `argmax(probs / Exp(1))`.

A seeded request draws its noise for output index n from a fresh generator seeded with
`mix_seed(seed, n)`, so its tokens depend on nothing but its own logits, seed and position:
not on the batch, not on the process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine import grammar
from engine.logits_processors import apply_rules, has_multi_token_bad_word, has_rules
from engine.request import Request, SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SampleResult:
    """One sampled token, with its raw logprob and top alternatives when asked for."""

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed for output token `index` of a request seeded with `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def needs_history(p: SamplingParams) -> bool:
    """Whether the row's next logits depend on its output tokens themselves, so it cannot be sampled ahead of the
    host reading them (engine/lookahead.py): penalties, a grammar, a bad word of several tokens."""
    return has_penalty(p) or bool(p.structured_output) or has_multi_token_bad_word(p)


def _plain(p: SamplingParams) -> bool:
    """Greedy with nothing that changes the logits or asks for logprobs: the argmax is the token."""
    return p.greedy and p.logprobs is None and not has_penalty(p) and not has_rules(p) and not p.structured_output


def _has_filter(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """`t` on the host: a CUDA tensor is copied into pinned memory without waiting, and the event returned is what
    to synchronize on before reading the copy; a CPU tensor is returned as it is (event None)."""
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def row_tensor(values: list[float] | list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on the device without a stream sync: a blocking copy would wait for every kernel queued
    before it, including a step launched ahead (engine/lookahead.py)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _token_counts(seqs: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab_size] float32 counts of each token in each row's sequence."""
    n = len(seqs)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    # Ids outside the logits' vocab fall into a dropped extra column instead of a neighbour's row.
    ids = ids.clamp(0, vocab_size)
    flat = torch.repeat_interleave(torch.arange(n) * (vocab_size + 1), lengths) + ids
    counts = torch.zeros(n * (vocab_size + 1), dtype=torch.float32, device=device)
    counts.index_add_(0, flat.to(device), torch.ones(flat.numel(), dtype=torch.float32, device=device))
    return counts.view(n, vocab_size + 1)[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    params = [r.params for r in requests]
    vocab, device = logits.shape[1], logits.device
    if any(p.repetition_penalty != 1.0 for p in params):
        seqs = [r.all_token_ids if r.params.repetition_penalty != 1.0 else [] for r in requests]
        seen = _token_counts(seqs, vocab, device) > 0
        rep = row_tensor([p.repetition_penalty for p in params], device, torch.float32)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        seqs = [r.output_token_ids if r.params.frequency_penalty or r.params.presence_penalty else [] for r in requests]
        counts = _token_counts(seqs, vocab, device)
        freq = row_tensor([p.frequency_penalty for p in params], device, torch.float32)[:, None]
        pres = row_tensor([p.presence_penalty for p in params], device, torch.float32)[:, None]
        logits = logits - freq * counts - pres * (counts > 0).float()
    return logits


def _apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, top-p then min-p with one sort; dropped tokens become -inf.

    Cut-offs are by value: a token tied with the last kept one is kept too, so the
    kept set never depends on how the sort orders ties.
    """
    vocab, device = logits.shape[1], logits.device
    top_k = row_tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device, torch.long)
    top_p = row_tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device, torch.float32)
    min_p = row_tensor([p.min_p for p in params], device, torch.float32)
    sorted_l, order = logits.sort(dim=-1, descending=True)
    sorted_l = sorted_l.masked_fill(sorted_l < sorted_l.gather(1, top_k[:, None] - 1), float("-inf"))
    probs = sorted_l.softmax(dim=-1)
    # Mass strictly above each position; the shifted cumsum is monotone, so the kept positions are a prefix.
    above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    num_kept = (above < top_p[:, None]).sum(dim=-1, keepdim=True)  # >= 1: above[:, 0] == 0 < top_p
    floor = torch.maximum(sorted_l.gather(1, num_kept - 1), sorted_l[:, :1] + min_p.log()[:, None])
    sorted_l = sorted_l.masked_fill(sorted_l < floor, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_l)


def process_logits(logits: torch.Tensor, requests: Sequence[Request], ahead: Sequence[int] | None = None,
                   eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Float32 logits after the request rules, penalties and, for non-greedy rows, temperature and filters (-inf =
    dropped). `ahead`: per row, sampled tokens not in its output yet (min_tokens counts them)."""
    logits = apply_rules(logits.float(), requests, ahead, eos_token_ids)
    logits = _apply_penalties(logits, requests)
    rand = [i for i, r in enumerate(requests) if not r.params.greedy]
    if not rand:
        return logits
    params = [requests[i].params for i in rand]
    idx = row_tensor(rand, logits.device, torch.long)
    sub = logits if len(rand) == len(requests) else logits[idx]
    sub = sub / row_tensor([p.temperature for p in params], logits.device, torch.float32)[:, None]
    if any(_has_filter(p) for p in params):
        sub = _apply_filters(sub, params)
    return sub if len(rand) == len(requests) else logits.index_copy(0, idx, sub)


class Sampler:
    """Samples one next token per row; stateless for seeded requests."""

    def __init__(self, seed: int = 0, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.seed = seed
        self.eos_token_ids = eos_token_ids  # banned with the stop tokens before min_tokens (the engine sets them)
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[SampleResult]:
        """Row i of `logits` ([N, V], any float dtype and device) gives the next token of requests[i]."""
        return self.sample_async(logits, requests).results()

    def sample_async(self, logits: torch.Tensor, requests: Sequence[Request], ahead: int | Sequence[int] = 0
                     ) -> DeviceSamples:
        """Queue the sampling kernels and the copy of their results to the host; nothing waits for the device.
        `ahead` (per row, or one for all) is how many sampled tokens of a request are not in its output yet (1
        for a step launched before the previous one's tokens were read): a seeded row draws the noise of its
        true output index."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests")
        params = [r.params for r in requests]
        ahead = [ahead] * len(requests) if isinstance(ahead, int) else list(ahead)
        assert not any(a and needs_history(p) for a, p in zip(ahead, params, strict=True)), "needs all tokens"
        if not requests:
            return DeviceSamples(None, params)
        if grammar.has_grammar(requests):
            logits = grammar.apply_masks(logits, requests)
        if all(_plain(p) for p in params):
            return DeviceSamples(logits.argmax(dim=-1), params)
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if any(p.logprobs is not None for p in params) else None
        processed = process_logits(logits, requests, ahead, self.eos_token_ids)
        tokens = processed.argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            idx = row_tensor(rand, logits.device, torch.long)
            probs = processed[idx].softmax(dim=-1)
            noise = self._noise([requests[i] for i in rand], logits.shape[1], logits.device, [ahead[i] for i in rand])
            tokens[idx] = (probs / noise).argmax(dim=-1)
        return DeviceSamples(tokens, params, raw_logprobs)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _noise(self, requests: Sequence[Request], vocab: int, device: torch.device,
               ahead: Sequence[int] | None = None) -> torch.Tensor:
        """[len(requests), vocab] Exp(1) noise; a seeded row's comes from its own fresh generator."""
        noise = torch.empty(len(requests), vocab, dtype=torch.float32, device=device)
        offset = ahead or [0] * len(requests)
        unseeded = [i for i, r in enumerate(requests) if r.params.seed is None]
        if unseeded:
            draw = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)
            draw.exponential_(generator=self._generator(device))
            noise.index_copy_(0, row_tensor(unseeded, device, torch.long), draw)
        for i, r in enumerate(requests):
            if r.params.seed is not None:
                gen = torch.Generator(device=device).manual_seed(mix_seed(r.params.seed, len(r.output_token_ids) + offset[i]))
                noise[i].exponential_(generator=gen)
        # A zero draw would turn a dropped token's 0/0 into NaN, which argmax would pick.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)


class DeviceSamples:
    """Sampled tokens (and logprobs) of one batch, on their way to the host.

    Everything the host will read is packed into one tensor whose copy to (pinned) host memory is queued at
    construction, with an event after it; `results()` waits for that event only. A blocking `.tolist()` would
    wait for the whole stream instead, including a step launched after this one.
    """

    def __init__(self, tokens: torch.Tensor | None, params: Sequence[SamplingParams],
                 raw_logprobs: torch.Tensor | None = None) -> None:
        self.tokens = tokens  # [N] int64 on the device: the next step's input ids when it is launched ahead
        self.params = list(params)
        self.k = max((p.logprobs or 0 for p in params), default=0) if raw_logprobs is not None else 0
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if tokens is None:
            return
        packed = tokens
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[:, None])
            top_v, top_i = raw_logprobs.topk(self.k, dim=-1)
            packed = torch.cat([tokens[:, None].double(), chosen.double(), top_i.double(), top_v.double()], dim=1)
        self._host, self._ready = copy_to_host(packed)

    def results(self) -> list[SampleResult]:
        """Wait for this batch's copy (not for later work on the stream) and unpack it."""
        if self._host is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        if self._host.dim() == 1:
            return [SampleResult(t, None, None) for t in self._host.tolist()]
        k, results = self.k, []
        for p, row in zip(self.params, self._host.tolist(), strict=True):
            if p.logprobs is None:
                results.append(SampleResult(int(row[0]), None, None))
                continue
            top = [(int(t), v) for t, v in zip(row[2 : 2 + p.logprobs], row[2 + k : 2 + k + p.logprobs], strict=True)]
            results.append(SampleResult(int(row[0]), row[1], top))
        return results
