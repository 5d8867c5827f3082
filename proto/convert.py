"""Wire messages (proto/disagg.proto) <-> engine and transfer types: the one place where both meet.

Sampling parameters are copied field by field *by name*: a new engine parameter needs only its field in
`engine.request.SamplingParams` and a field of the same name in the .proto's SamplingParams (the router's HTTP
model maps onto it by name too, router/job.py). Load reports carry every figure in a name -> value map whose names
and help texts come from dataclass fields (`engine.stats.stat`), so a new figure needs no edit here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from engine.parallel.kv_heads import KVHeadLayout
from engine.request import InvalidRequestError, PromptLogprob, SamplingParams
from engine.stats import stat_items
from kvtransfer import KVLayout
from proto import disagg_pb2

# Applied by the router to the text, never by a worker: not on the wire.
ROUTER_ONLY_PARAMS = frozenset({"stop", "skip_special_tokens"})

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen token's logprob, [(token, logprob), ...])


def _field_kind(f: FieldDescriptor) -> str:
    """map (logit_bias), lists (a repeated one-field message: TokenIds, a tuple of tuples in the engine),
    repeated, or scalar."""
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return "map"
    if f.is_repeated:
        return "lists" if f.message_type is not None else "repeated"
    return "scalar"


# Classified once, at import: GetOptions() imports descriptor_pb2 on its first call (0.2 s without bytecode
# caches), which a worker's first request paid in its handler (seen in first_requests' dumps on a GPU machine).
_PARAM_KINDS: dict[str, str] = {f.name: _field_kind(f) for f in disagg_pb2.SamplingParams.DESCRIPTOR.fields}


def params_to_proto(p: SamplingParams) -> disagg_pb2.SamplingParams:
    """Engine params -> wire params. Tuples become repeated fields, tuples of pairs maps (logit_bias), tuples of
    tuples repeated one-field messages (bad_words_ids)."""
    m = disagg_pb2.SamplingParams()
    by_name = m.DESCRIPTOR.fields_by_name
    for f in fields(p):
        value = getattr(p, f.name)
        if f.name in ROUTER_ONLY_PARAMS or value is None:
            continue
        kind = _PARAM_KINDS[f.name]
        if kind == "map":
            getattr(m, f.name).update(dict(value))
        elif kind == "lists":
            inner = by_name[f.name].message_type.fields[0].name
            for seq in value:
                getattr(getattr(m, f.name).add(), inner).extend(seq)
        elif isinstance(value, tuple):
            getattr(m, f.name).extend(value)
        else:
            setattr(m, f.name, value)
    return m


def params_from_proto(m: disagg_pb2.SamplingParams) -> SamplingParams:
    """Wire params -> engine params; raises InvalidRequestError naming the bad field."""
    kwargs: dict[str, Any] = {}
    for f in m.DESCRIPTOR.fields:
        kind = _PARAM_KINDS[f.name]
        if kind == "map":
            kwargs[f.name] = tuple(sorted(getattr(m, f.name).items()))
        elif kind == "lists":
            inner = f.message_type.fields[0].name
            kwargs[f.name] = tuple(tuple(getattr(x, inner)) for x in getattr(m, f.name))
        elif kind == "repeated":
            kwargs[f.name] = tuple(getattr(m, f.name))
        elif not f.has_presence or m.HasField(f.name):
            kwargs[f.name] = getattr(m, f.name)
    try:
        return SamplingParams.from_kwargs(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(str(e)) from None


def logprob_to_proto(lp: Logprob) -> disagg_pb2.TokenLogprob:
    return disagg_pb2.TokenLogprob(logprob=lp[0], top_ids=[t for t, _ in lp[1]], top_logprobs=[v for _, v in lp[1]])


def logprob_from_proto(m: disagg_pb2.TokenLogprob) -> Logprob:
    return m.logprob, list(zip(m.top_ids, m.top_logprobs, strict=True))


def prompt_logprobs_to_proto(records: list[PromptLogprob | None]) -> list[disagg_pb2.TokenLogprob]:
    """An engine's prompt logprobs (None first) -> the wire's entries, one per prompt token after the first."""
    return [disagg_pb2.TokenLogprob(logprob=lp, rank=rank, top_ids=[t for t, _ in top], top_logprobs=[v for _, v in top])
            for lp, rank, top in (r for r in records if r is not None)]


def prompt_logprobs_from_proto(entries: Iterable[disagg_pb2.TokenLogprob]) -> list[PromptLogprob | None]:
    """The wire's entries -> the engine's shape (None for the first prompt token)."""
    return [None, *((m.logprob, m.rank, list(zip(m.top_ids, m.top_logprobs, strict=True))) for m in entries)]


def layout_to_proto(layout: KVLayout) -> disagg_pb2.KVLayout:
    return disagg_pb2.KVLayout(**layout.to_dict())


def layout_from_proto(m: disagg_pb2.KVLayout) -> KVLayout:
    return KVLayout.from_dict({f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields})


def kv_heads_to_proto(layout: KVHeadLayout) -> disagg_pb2.KVHeadLayout:
    d = layout.to_dict()
    return disagg_pb2.KVHeadLayout(**{**d, "heads": [disagg_pb2.HeadRange(start=a, stop=b) for a, b in d["heads"]]})


def kv_heads_from_proto(m: disagg_pb2.KVHeadLayout) -> KVHeadLayout:
    """ValueError when the ranges do not describe the model's heads (a malformed or truncated message)."""
    return KVHeadLayout(m.num_kv_heads, tuple((h.start, h.stop) for h in m.heads), m.num_layers, m.block_size,
                        m.head_dim, m.dtype, m.num_blocks)


def load_to_proto(worker_id: str, role: str, stat_objects: Iterable[Any], want_help: bool) -> disagg_pb2.LoadReport:
    """A Load report of every `stat` field of the given dataclass instances."""
    rep = disagg_pb2.LoadReport(worker_id=worker_id, role=role)
    for name, value, text in stat_items(*stat_objects):
        rep.stats[name] = value
        if want_help:
            rep.stat_help[name] = text
    return rep


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's latest Load report as the router reads it: every figure by name, the usual ones as properties."""

    stats: Mapping[str, float] = field(default_factory=dict)

    def get(self, name: str, default: float = 0.0) -> float:
        return self.stats.get(name, default)

    def __getattr__(self, name: str) -> float:
        """Any other figure by name (`load.transfers`), as the worker sent it."""
        if name.startswith("__") or name == "stats":
            raise AttributeError(name)
        try:
            return self.stats[name]
        except KeyError:
            raise AttributeError(f"the Load report has no figure {name!r}") from None

    @property
    def num_waiting(self) -> int:
        return int(self.get("num_waiting"))

    @property
    def num_running(self) -> int:
        return int(self.get("num_running"))

    @property
    def leased_requests(self) -> int:
        return int(self.get("leased_requests"))

    @property
    def queued_prefill_tokens(self) -> int:
        return int(self.get("queued_prefill_tokens"))

    @property
    def kv_blocks_total(self) -> int:
        return int(self.get("kv_blocks_total"))

    @property
    def kv_blocks_free(self) -> int:
        return int(self.get("kv_blocks_free"))

    @property
    def kv_usage(self) -> float:
        return self.get("kv_usage")


def load_from_proto(rep: disagg_pb2.LoadReport) -> WorkerLoad:
    return WorkerLoad(dict(rep.stats))
