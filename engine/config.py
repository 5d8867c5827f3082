"""Frozen configuration dataclasses, one per component, validated on construction.

No I/O happens here: `from_mapping` builds any of them from an already-parsed mapping (YAML is read by
`deploy.config.ClusterConfig.load`). Every component's config, router and deploy included, is built with it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


ROPE_TYPES = ("llama3", "linear")
ARCHITECTURES = ("llama", "qwen3", "gemma2", "gemma3", "qwen2_moe", "qwen3_moe", "mixtral")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama-3.1's frequency-dependent ("llama3") or plain position interpolation ("linear")."""

    factor: float = 8.0  # how much longer than the original context the model was tuned for
    low_freq_factor: float = 1.0  # llama3: wavelengths above orig/low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below orig/high_freq_factor are untouched
    original_max_position_embeddings: int = 8192  # llama3: the pre-extension context length
    rope_type: str = "llama3"  # llama3 | linear (every frequency divided by factor: Gemma 3's global layers)

    def __post_init__(self) -> None:
        _check(self.rope_type in ROPE_TYPES, f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        _check(self.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {self.factor}")
        _check(self.high_freq_factor > self.low_freq_factor, "rope_scaling needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts feed-forward: a router sends each token to k of num_experts gated MLPs."""

    num_experts: int  # routed experts in each MoE layer
    num_experts_per_tok: int  # experts each token is sent to (top-k)
    intermediate_size: int  # inner width of one routed expert
    norm_topk_prob: bool = True  # renormalise the k chosen softmax weights to sum 1 (Mixtral, Qwen3-MoE); else keep them
    shared_expert_intermediate_size: int = 0  # inner width of an always-on, sigmoid-gated shared expert (Qwen2-MoE); 0: none
    dense_layers: tuple[int, ...] = ()  # layers that keep a dense MLP of the model's intermediate_size instead

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "intermediate_size"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"moe.{name} must be a positive int")
        _check(self.num_experts_per_tok <= self.num_experts, "moe.num_experts_per_tok must be <= num_experts")
        _check(isinstance(self.shared_expert_intermediate_size, int) and self.shared_expert_intermediate_size >= 0,
               "moe.shared_expert_intermediate_size must be an int >= 0")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        _check(all(isinstance(i, int) and i >= 0 for i in self.dense_layers), "moe.dense_layers must be layer indices")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer of one of the families in engine/models (see docs/models.md)."""

    vocab_size: int  # rows of the embedding table
    hidden_size: int  # model width d
    intermediate_size: int  # gated-MLP inner width (of the dense layers, in a mixture-of-experts model)
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int = 0  # per-head width; 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base (of the global layers, where they differ)
    rope_scaling: RopeScaling | None = None  # RoPE scaling of the global layers, or None for plain RoPE
    max_position_embeddings: int = 2048  # the model's context length
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = 1  # beginning-of-sequence token
    eos_token_ids: tuple[int, ...] = (2,)  # tokens that end generation
    architecture: str = "llama"  # the family (engine/models/registry.py) that builds this shape
    o_proj_bias: bool = False  # the attention output projection carries a bias
    qk_norm: bool = False  # RMSNorm over every query and key head before rotary (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # gate activation of the MLPs: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included; None: no sliding layers
    layer_types: tuple[str, ...] = ()  # per layer full_attention | sliding_attention; () = all sliding iff sliding_window
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # attention scores s -> cap * tanh(s / cap) before the softmax (Gemma 2)
    final_logit_softcap: float | None = None  # output logits z -> cap * tanh(z / cap) (Gemma 2)
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    moe: MoEConfig | None = None  # sparse mixture-of-experts feed-forward; None: every layer has a dense MLP

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"model.{name} must be a positive int")
        _check(self.num_heads % self.num_kv_heads == 0, "model.num_heads must be a multiple of num_kv_heads")
        if self.head_dim == 0:
            _check(self.hidden_size % self.num_heads == 0, "hidden_size must divide by num_heads when head_dim is 0")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check(self.head_dim % 2 == 0, "model.head_dim must be even for RoPE")
        _check(self.max_position_embeddings > 0, "model.max_position_embeddings must be positive")
        _check(self.architecture in ARCHITECTURES,
               f"model.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        _check(self.hidden_act in ACTIVATIONS, f"model.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        _check(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
               "model.sliding_window must be a positive int or null")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, f"model.{name} must be positive or null")
        self._normalise_layer_types()
        _check(self.moe is None or all(i < self.num_layers for i in self.moe.dense_layers),
               "model.moe.dense_layers names a layer past num_layers")

    def _normalise_layer_types(self) -> None:
        """layer_types always ends up with one entry per layer."""
        types = tuple(self.layer_types) or (
            ("sliding_attention" if self.sliding_window else "full_attention"),) * self.num_layers
        object.__setattr__(self, "layer_types", types)
        _check(len(types) == self.num_layers, f"model.layer_types has {len(types)} entries for {self.num_layers} layers")
        _check(all(t in LAYER_TYPES for t in types), f"model.layer_types entries must be one of {LAYER_TYPES}")
        _check(self.sliding_window is not None or "sliding_attention" not in types,
               "model.layer_types has sliding layers but sliding_window is null")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, how many most recent keys (the query's own included) a query attends to; None: all of them."""
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def kv_window(self) -> int | None:
        """The trailing positions any layer still reads when every layer slides; None when some layer is global.
        A query at position p reads keys p - kv_window + 1 .. p of every layer and nothing older."""
        windows = self.layer_windows
        return None if None in windows else max(w for w in windows if w is not None)

    @classmethod
    def from_hf(cls, d: dict[str, Any], **family: Any) -> ModelConfig:
        """Build from a Hugging Face `config.json` mapping; `family` sets the fields its architecture decides."""
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        try:
            fields_ = dict(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                head_dim=int(d.get("head_dim") or 0),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=hf_rope_scaling(rs),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None
        return cls(**{**fields_, **family})


def hf_rope_scaling(rs: dict[str, Any] | None) -> RopeScaling | None:
    """A Hugging Face rope_scaling / rope_parameters mapping as a RopeScaling (None for plain RoPE)."""
    kind = rs.get("rope_type", rs.get("type")) if rs else None
    if kind in (None, "default"):
        return None
    assert rs is not None
    if kind == "linear":
        return RopeScaling(factor=float(rs["factor"]), rope_type="linear")
    if kind == "llama3":
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    raise ConfigError(f"unsupported rope_scaling type {kind!r}")



@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # tokens per KV block
    memory_budget_bytes: int = 512 * 1024 * 1024  # bytes the KV pool may take (ignored when num_blocks is set)
    num_blocks: int | None = None  # exact pool size in blocks; overrides the memory budget
    enable_prefix_caching: bool = True  # reuse KV of full blocks whose token prefix was seen before

    def __post_init__(self) -> None:
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0, "cache.block_size must be a power of two")
        _check(self.memory_budget_bytes > 0, "cache.memory_budget_bytes must be positive")
        _check(self.num_blocks is None or self.num_blocks > 0, "cache.num_blocks must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64  # most requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prompt chunks + decode tokens)

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "scheduler.max_num_seqs must be positive")
        _check(self.max_num_batched_tokens > 0, "scheduler.max_num_batched_tokens must be positive")


SPEC_METHODS = ("ngram", "draft", "self")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a cheap proposer guesses k tokens, the target model verifies them in one pass."""

    method: str | None = None  # "ngram" (prompt lookup), "draft" (a separate small model), "self" (first layers); None: off
    num_speculative_tokens: int = 4  # draft tokens proposed per request per step (k)
    ngram_min: int = 2  # shortest suffix n-gram the ngram proposer looks up (1-grams match too often to pay off)
    ngram_max: int = 4  # longest suffix n-gram, tried first
    draft_model: str | None = None  # the draft model for "draft": an HF folder, a .gguf file or "smollm2"
    self_draft_layers: int = 1  # leading target layers (+ final norm + LM head) that form the "self" draft

    def __post_init__(self) -> None:
        _check(self.method is None or self.method in SPEC_METHODS,
               f"speculative.method must be one of {', '.join(SPEC_METHODS)} or null, got {self.method!r}")
        _check(isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 32,
               f"speculative.num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        _check(isinstance(self.ngram_min, int) and isinstance(self.ngram_max, int) and 1 <= self.ngram_min <= self.ngram_max,
               f"speculative needs 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        _check(self.method != "draft" or bool(self.draft_model), "speculative.method draft needs draft_model")
        _check(isinstance(self.self_draft_layers, int) and self.self_draft_layers >= 1,
               f"speculative.self_draft_layers must be a positive int, got {self.self_draft_layers}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


PARALLEL_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks of a tensor-parallel engine talk (their number is EngineConfig.tensor_parallel_size)."""

    backend: str = "auto"  # collectives: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    collective_timeout_s: float = 120.0  # a rank waiting this long in a collective (or for a reply) fails the step
    start_timeout_s: float = 900.0  # the other ranks must have started and loaded their shards within this

    def __post_init__(self) -> None:
        _check(self.backend in PARALLEL_BACKENDS, f"parallel.backend must be one of {PARALLEL_BACKENDS}, "
               f"got {self.backend!r}")
        _check(self.collective_timeout_s > 0, "parallel.collective_timeout_s must be positive")
        _check(self.start_timeout_s > 0, "parallel.start_timeout_s must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine instance needs."""

    model: str = "smollm2"  # "smollm2" (the packaged GGUF), an HF folder, a .gguf file, or a model name for dummy
    load_format: str = "auto"  # auto | hf | gguf | dummy
    dummy_model: ModelConfig | None = None  # the shape to build when load_format is dummy
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantization: str | None = None  # weights quantized at load: int8 (weight-only, per channel; CPU), fp8 (e4m3,
    # per channel; GPU sm90+, elsewhere dequantized with a warning: docs/models.md) or null
    device: str = "cpu"  # torch device string
    cpu_threads: int | str = "adaptive"  # CPU, one rank: threads per step; adaptive = the cores the rest of the
    # machine leaves idle, at least the process's starting count (OMP_NUM_THREADS); N = always N
    cpu_share: str = ""  # adaptive: a file (in /dev/shm) every engine process of the machine shares its cores
    # through, re-choosing threads between layers; "" = $DISAGG_CPU_SHARE (set by `disagg serve`) or none
    attention_backend: str = "auto"  # auto | torch | triton
    max_model_len: int | None = None  # cap on prompt + output tokens; None means the model's context
    enforce_eager: bool = False  # never use CUDA graphs (they are used on CUDA with the triton backend); a prefill
    # pool's workers default to True (deploy/config.py: they run no decode steps)
    cuda_graph_max_batch: int = 256  # largest decode batch captured in a CUDA graph
    overlap_steps: bool | None = None  # queue each decode step before reading the last one's tokens; None: on CUDA
    seed: int = 0  # seed for dummy weights and for unseeded sampling
    cache: CacheConfig = field(default_factory=CacheConfig)  # KV cache settings
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batching settings
    speculative: SpeculativeConfig | None = None  # speculative decoding; None (or method None) turns it off
    tensor_parallel_size: int = 1  # ranks (one process, one device each) the model is split across (docs/parallel.md)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # how those ranks talk

    def __post_init__(self) -> None:
        _check(self.load_format in ("auto", "hf", "gguf", "dummy"), f"unknown load_format {self.load_format!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")
        _check(self.quantization in (None, "int8", "fp8"),
               f"quantization must be int8, fp8 or null, got {self.quantization!r}")
        _check(self.attention_backend in ("auto", "torch", "triton"), f"unknown attention_backend {self.attention_backend!r}")
        _check(self.load_format != "dummy" or self.dummy_model is not None, "load_format dummy needs dummy_model")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len must be positive")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}")
        _check(self.cpu_threads == "adaptive" or (isinstance(self.cpu_threads, int) and not isinstance(
            self.cpu_threads, bool) and self.cpu_threads >= 1),
            f"cpu_threads must be adaptive or a positive int, got {self.cpu_threads!r}")
        _check(isinstance(self.cpu_share, str) and (self.cpu_share == "" or self.cpu_share.startswith("/")),
               f"cpu_share must be an absolute path or empty, got {self.cpu_share!r}")
        _check(not self.cpu_share or self.cpu_threads == "adaptive", "cpu_share needs cpu_threads: adaptive")
        _check(self.overlap_steps is None or isinstance(self.overlap_steps, bool),
               f"overlap_steps must be true, false or null, got {self.overlap_steps!r}")

    def overlaps_steps(self, cuda: bool) -> bool:
        """Whether the engine queues each decode step before reading the last one's tokens (engine/lookahead.py):
        as configured, else on CUDA."""
        return self.overlap_steps if self.overlap_steps is not None else cuda

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        """Build from a parsed YAML/JSON mapping; unknown keys are errors."""
        return from_mapping(cls, d, "engine")


def from_mapping(cls: type, d: Any, where: str) -> Any:
    """Build the frozen dataclass `cls` from a parsed YAML/JSON mapping, naming `where` in every error.

    Unknown keys are errors; a nested mapping becomes the dataclass its field is typed as (also `X | None`); a
    list becomes a tuple where the field is a tuple. Values are checked by the dataclass's own `__post_init__`.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints.get(k), v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, v: Any, where: str) -> Any:
    """A nested mapping -> the dataclass `hint` names; a list -> a tuple where `hint` is a tuple."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if isinstance(v, dict):
        sub = next((t for t in options if isinstance(t, type) and is_dataclass(t)), None)
        return from_mapping(sub, v, where) if sub is not None else v
    if isinstance(v, list) and any(t is tuple or typing.get_origin(t) is tuple for t in options):
        return tuple(v)
    return v


def asdict_shallow(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict, nested dataclasses included (for logging)."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = asdict_shallow(v) if is_dataclass(v) else v
    return out
