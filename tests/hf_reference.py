"""Hugging Face transformers as the correctness reference: greedy tokens plus per-step top-2 logprobs."""

from __future__ import annotations

import functools
import os

import torch


def smollm2_hf_model():  # noqa: ANN201
    """transformers' own reading of the packaged SmolLM2 GGUF (tests share one: the `smollm2_hf` fixture)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from engine.loader import smollm2_gguf_path

    path = smollm2_gguf_path()
    # transformers builds gguf's tensor-name map once per module of the model (~400 times, ~10 s on a slow CPU);
    # the map depends only on its arguments, so the same answer is handed back for the length of this load.
    uncached = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(uncached)
    try:
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    finally:
        gguf.get_tensor_name_map = uncached


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[list[tuple[int, float]]]]:  # noqa: ANN001
    """Greedy continuation and, per generated position, the two best (token, logprob) pairs."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [_top2(logits[0]) for logits in out.logits]


@torch.inference_mode()
def hf_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int  # noqa: ANN001
                    ) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    """`hf_greedy` of every prompt, generated together (left-padded, the padding masked out): ~3x faster on a CPU,
    where a batch of one is transformers' per-step overhead. SmolLM2's eight parity prompts give the same tokens as
    one at a time, their logprobs within 2e-5 (2026-12-08), well inside compare_greedy's near-tie tolerance."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return [(out.sequences[row, width:].tolist(), [_top2(logits[row]) for logits in out.logits])
            for row in range(len(prompts))]


def _top2(logits: torch.Tensor) -> list[tuple[int, float]]:
    v, i = torch.log_softmax(logits.float(), -1).topk(2)
    return [(int(i[0]), float(v[0])), (int(i[1]), float(v[1]))]


def compare_greedy(ours: list[list[int]], ours_lp: list, ref: list[list[int]], ref_top2: list,
                   tol: float = 1e-3) -> int:
    """Assert token equality; a divergence must be a near-tie on both sides and ends that prompt's comparison.

    Returns the number of prompts that ended at a near-tie (the caller bounds it).
    """
    ties = 0
    for p, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x == y:
                continue
            ref_gap = ref_top2[p][i][0][1] - ref_top2[p][i][1][1]
            our_top = ours_lp[p][i][1]
            our_gap = our_top[0][1] - our_top[1][1]
            assert ref_gap < tol and our_gap < tol and {x, y} == {ref_top2[p][i][0][0], ref_top2[p][i][1][0]}, (
                f"prompt {p} diverges at token {i}: ours {x} vs HF {y}, top-2 gaps HF {ref_gap:.2e} ours {our_gap:.2e}")
            ties += 1
            break
        else:
            assert len(a) == len(b), f"prompt {p}: {len(a)} tokens vs HF {len(b)}"
    return ties
