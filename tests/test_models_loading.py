"""Loading every family: HF folders (sharded too), GGUF files as llama.cpp writes them, hub-style config.json
files, dummy weights, and the errors: an unsupported architecture or a missing tensor is named, nothing loads."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from engine import gguf_loader
from engine.config import EngineConfig, ModelConfig, MoEConfig, RopeScaling
from engine.loader import WeightLoadError, iter_weights, load_model_config, resolve_source
from engine.model_runner import load_model
from engine.models import registry
from tests.hf_reference import hf_greedy
from tests.test_models_families import COMMON, FAMILIES, build_hf


def load(source: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    fmt, path = resolve_source(source, "auto")
    config = load_model_config(fmt, path)
    return config, dict(iter_weights(fmt, path, config, torch.float32))


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, as saved (one tensor per expert)."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


# ------------------------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gemma3"])
def test_sharded_hf_folder(tmp_path: Path, family: str) -> None:
    model = build_hf(family, tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config, weights = load(str(tmp_path / "sharded"))
    want = checkpoint(tmp_path / "one")
    assert config.architecture == family and set(weights) == set(want)
    assert all(torch.equal(weights[k], want[k]) for k in weights)


def test_missing_expert_tensor_is_named_and_nothing_loads(tmp_path: Path) -> None:
    build_hf("qwen3_moe", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    config = load_model_config("hf", str(tmp_path))
    with pytest.raises(WeightLoadError, match=r"missing tensor\(s\) model.layers.2.mlp.experts.5.up_proj.weight"):
        iter_weights("hf", str(tmp_path), config, torch.float32)  # raises before the first tensor is read
    with pytest.raises(WeightLoadError, match="experts.5.up_proj"):
        load_model(EngineConfig(model=str(tmp_path)), torch.device("cpu"))


@pytest.mark.parametrize("arch", ["Gemma3ForConditionalGeneration", "DeepseekV3ForCausalLM"])
def test_unsupported_architecture_is_named(tmp_path: Path, arch: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], "vocab_size": 8}))
    with pytest.raises(WeightLoadError, match=f"config.json: unsupported architecture '{arch}'"):
        load_model_config("hf", str(tmp_path))


HUB_GEMMA3 = dict(architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                  num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=512,
                  sliding_window_pattern=6, rope_theta=1000000, rope_local_base_freq=10000,
                  rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=32768,
                  final_logit_softcapping=None, attn_logit_softcapping=None, eos_token_id=[1, 106], bos_token_id=2)


def test_hub_style_configs(tmp_path: Path) -> None:
    """Configs as the hub has them (no layer_types, older key names) map onto the same fields."""
    gemma3 = registry.config_from_hf(HUB_GEMMA3)
    assert (gemma3.rope_theta, gemma3.rope_local_theta, gemma3.rope_scaling) == (1e6, 1e4, RopeScaling(8.0, rope_type="linear"))
    assert gemma3.layer_windows[:6] == (512,) * 5 + (None,) and gemma3.kv_window is None
    assert gemma3.qk_norm and gemma3.tie_word_embeddings and gemma3.attn_logit_softcap is None
    qwen3_moe = registry.config_from_hf(dict(
        COMMON, architectures=["Qwen3MoeForCausalLM"], num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[2], head_dim=128))
    assert qwen3_moe.moe == MoEConfig(128, 8, 768, True, 0, (0, 2))
    qwen2 = registry.config_from_hf(dict(COMMON, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                         sliding_window=64, max_window_layers=2))
    assert qwen2.layer_windows == (None, None, 64) and qwen2.attention_bias and not qwen2.o_proj_bias


def test_dummy_moe_model_runs() -> None:
    """The benchmarks' path: random weights of a Qwen3-MoE shape, straight from a ModelConfig."""
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    shape = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, architecture="qwen3_moe", qk_norm=True, moe=MoEConfig(8, 2, 16))
    eng = LLMEngine(EngineConfig(model="qwen3-moe-tiny", load_format="dummy", dummy_model=shape))
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()


# ------------------------------------------------------------------------------------------------- GGUF

# the GGUF test models: what llama.cpp can express (Gemma's attention scale is head_dim^-1/2 below 27B, Qwen3 has
# no windows), each with its llama.cpp architecture
GGUF_MODELS = {
    "qwen2": ("qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON))),
    "qwen3": ("qwen3", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=128))),  # transformers reads 128
    "qwen3_moe": ("qwen3moe", FAMILIES["qwen3_moe"][1]),
    # transformers reads no expert widths from a GGUF: this one has Qwen2-MoE's default widths
    "qwen2_moe": ("qwen2moe", lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 2},
                                                                               num_experts=4, num_experts_per_tok=2))),
    "gemma2": ("gemma2", lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=20, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, attn_implementation="eager"))),
    "gemma3": ("gemma3", FAMILIES["gemma3"][1]),
    "mixtral": ("llama", FAMILIES["mixtral"][1]),
}


def write_gguf(path: Path, hf: tf.PreTrainedModel, arch: str, folder: Path,
               edit: Callable[[dict[str, torch.Tensor]], None] = lambda tensors: None) -> None:
    """What llama.cpp's convert_hf_to_gguf writes: reversed names, llama Q/K rows permuted, Gemma norms + 1,
    experts stacked per projection, the model's shape in `{arch}.*` metadata."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in _gguf_meta(c, arch).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32 if isinstance(value, int) else w.add_string)(
            f"{arch}.{key}", value)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = _gguf_tensors(checkpoint(folder), c, arch)
    edit(tensors)
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_meta(c: tf.PretrainedConfig, arch: str) -> dict[str, int | float | str]:
    meta: dict[str, int | float | str] = dict(
        block_count=c.num_hidden_layers, context_length=c.max_position_embeddings, embedding_length=c.hidden_size,
        feed_forward_length=c.intermediate_size, vocab_size=c.vocab_size, **{
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "attention.key_length": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)})
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    meta["rope.freq_base"] = float(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(rope["factor"])})
    if getattr(c, "sliding_window", None):
        meta["attention.sliding_window"] = c.sliding_window
    if arch == "gemma3":
        meta.update({"rope.freq_base_swa": float(c.rope_parameters["sliding_attention"]["rope_theta"]),
                     "attention.sliding_window_pattern": c._sliding_window_pattern})
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None):
            meta[key] = float(getattr(c, key))
    if getattr(c, "num_experts_per_tok", None):
        meta.update(expert_count=getattr(c, "num_experts", None) or c.num_local_experts,
                    expert_used_count=c.num_experts_per_tok,
                    expert_feed_forward_length=getattr(c, "moe_intermediate_size", c.intermediate_size))
        if getattr(c, "shared_expert_intermediate_size", None):
            meta["expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    return meta


def _gguf_tensors(state: dict[str, torch.Tensor], c: tf.PretrainedConfig, arch: str) -> dict[str, torch.Tensor]:
    gemma = arch.startswith("gemma")
    names = {v: k for k, v in {**gguf_loader.TOP, **(gguf_loader.GEMMA_LAYER if gemma else gguf_loader.LAYER)}.items()}
    mixtral = {v: k for k, v in gguf_loader.MIXTRAL_NAMES}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for name, t in state.items():
        for theirs, ours in mixtral.items():
            name = name.replace(theirs, ours)
        stem, kind = name.rsplit(".", 1)
        parts = stem.split(".")
        if ".experts." in name:  # model.layers.L.mlp.experts.E.proj
            exps = {v: k for k, v in gguf_loader.EXPERTS.items()}[parts[-1]]
            experts.setdefault(f"blk.{parts[2]}.{exps}.{kind}", []).append(t)
            continue
        g = names[stem] if len(parts) < 3 else f"blk.{parts[2]}.{names['.'.join(parts[3:])]}"
        if arch == "llama" and parts[-1] in ("q_proj", "k_proj"):
            heads = c.num_attention_heads if parts[-1] == "q_proj" else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if gemma and name.endswith("norm.weight"):
            t = t + 1
        out[f"{g}.{kind}"] = t.reshape(-1) if name.endswith("shared_expert_gate.weight") else t
    return {**out, **{k: torch.stack(v) for k, v in experts.items()}}  # experts listed in order 0, 1, ...


def make_gguf(family: str, folder: Path) -> tuple[str, tf.PreTrainedModel]:
    """The family's GGUF test model saved as an HF folder and as `folder`/model.gguf: (llama.cpp arch, model)."""
    arch, make = GGUF_MODELS[family]
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(folder)
    write_gguf(folder / "model.gguf", model, arch, folder)
    return arch, model


@pytest.fixture(scope="module", params=list(GGUF_MODELS))
def gguf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = tmp_path_factory.mktemp(request.param)
    arch, model = make_gguf(request.param, folder)
    return request.param, arch, folder, model


def test_gguf_config_and_weights_equal_the_hf_folder(gguf_model: tuple) -> None:
    family, _, folder, _ = gguf_model
    hf_config, hf_weights = load(str(folder))
    config, weights = load(str(folder / "model.gguf"))
    # GGUF metadata holds float32 numbers and the tokenizer's special ids
    same = dataclasses.replace(hf_config, eos_token_ids=(2,), bos_token_id=1,
                               rms_norm_eps=float(np.float32(hf_config.rms_norm_eps)))
    assert config == same, family
    assert list(weights) and set(weights) == set(hf_weights)
    assert all(torch.equal(weights[k], hf_weights[k]) for k in weights)


def test_transformers_reads_the_test_gguf_alike(gguf_model: tuple) -> None:
    """transformers' own GGUF reader (which follows llama.cpp) finds the same weights in the test's files, so
    the writer above, and with it the reader under test, use llama.cpp's conventions."""
    family, arch, folder, model = gguf_model
    if arch in ("llama", "qwen3moe"):
        pytest.skip("transformers reads no Mixtral GGUF, nor Qwen3-MoE's expert width or dense layers")
    ours = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    want = model.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.allclose(t, want[name], atol=1e-6), f"{family}: {name}"


def test_gguf_mixtral_generates_as_transformers(tmp_path: Path) -> None:
    """One family through the whole engine from its GGUF (the others' weights and configs are equal to theirs)."""
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    _, model = make_gguf("mixtral", tmp_path)
    prompt = list(range(3, 40))
    eng = LLMEngine(EngineConfig(model=str(tmp_path / "model.gguf")))
    eng.add_request("a", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while eng.has_unfinished():
        tokens += [t for so in eng.step() for t in so.new_token_ids]
    assert tokens == hf_greedy(model, prompt, 8)[0]


def test_misshapen_gguf_expert_tensor_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FAMILIES["qwen3_moe"][1]().eval()
    model.save_pretrained(tmp_path)

    def cut(tensors: dict[str, torch.Tensor]) -> None:
        tensors["blk.0.ffn_down_exps.weight"] = tensors["blk.0.ffn_down_exps.weight"][:, :, :-1].contiguous()

    write_gguf(tmp_path / "bad.gguf", model, "qwen3moe", tmp_path, edit=cut)
    config = load_model_config("gguf", str(tmp_path / "bad.gguf"))
    with pytest.raises(WeightLoadError, match=r"bad.gguf \[blk.0.ffn_down_exps.weight\]: tensor "
                                              r"model.layers.0.mlp.experts.0.down_proj.weight has shape \(64, 31\)"):
        iter_weights("gguf", str(tmp_path / "bad.gguf"), config, torch.float32)
