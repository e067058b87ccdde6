"""EAGLE / EAGLE-3 heads in their published layouts, on a tiny random Llama target.

The heads are random tensors written under the checkpoint names of
yuhuili/EAGLE-LLaMA3-Instruct-8B (``fc``, ``layers.0.*`` without an input norm) and
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B (``fc`` over three layers, ``midlayer.*``,
``norm``, ``lm_head`` over a draft vocabulary with ``d2t``). A reference written
here in plain torch (full causal attention over the sequence, the target's hidden
states from transformers) gives the drafts the head must propose; greedy output
must equal the target's without speculation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts
from safetensors.torch import save_file

H, HEADS, KV, HD, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 2, 16, 128, 512, 300
OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_model_len=96, max_num_seqs=8,
               max_num_batched_tokens=40, num_kv_blocks=64)  # fmt: skip


def _layer(prefix: str, in_dim: int, gen: torch.Generator, norms: tuple[str, ...]) -> dict[str, torch.Tensor]:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    out = {
        f"{prefix}.self_attn.q_proj.weight": w(HEADS * HD, in_dim),
        f"{prefix}.self_attn.k_proj.weight": w(KV * HD, in_dim),
        f"{prefix}.self_attn.v_proj.weight": w(KV * HD, in_dim),
        f"{prefix}.self_attn.o_proj.weight": w(H, HEADS * HD),
        f"{prefix}.mlp.gate_proj.weight": w(INTER, H),
        f"{prefix}.mlp.up_proj.weight": w(INTER, H),
        f"{prefix}.mlp.down_proj.weight": w(H, INTER),
    }
    for n in norms:
        out[f"{prefix}.{n}.weight"] = 1 + 0.1 * torch.randn(H, generator=gen)
    return out


def write_head(path: Path, kind: str, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=INTER,
                  num_hidden_layers=1, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, hidden_act="silu", architectures=["LlamaForCausalLM"])  # fmt: skip
    if kind == "eagle":
        tensors = {"fc.weight": torch.randn(H, 2 * H, generator=gen) / math.sqrt(2 * H),
                   "fc.bias": 0.1 * torch.randn(H, generator=gen)}  # fmt: skip
        tensors.update(_layer("layers.0", H, gen, ("post_attention_layernorm",)))
    else:
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB,
                      eagle_aux_hidden_state_layer_ids=[0, 1, 1])  # a 2-layer target  # fmt: skip
        keep = torch.sort(torch.randperm(VOCAB, generator=gen)[:DRAFT_VOCAB]).values
        tensors = {"fc.weight": torch.randn(H, 3 * H, generator=gen) / math.sqrt(3 * H),
                   "norm.weight": 1 + 0.1 * torch.randn(H, generator=gen),
                   "lm_head.weight": 3 * torch.randn(DRAFT_VOCAB, H, generator=gen) / math.sqrt(H),
                   "d2t": keep - torch.arange(DRAFT_VOCAB), "t2d": torch.zeros(VOCAB, dtype=torch.bool)}  # fmt: skip
        tensors["t2d"][keep] = True
        tensors.update(_layer("midlayer", 2 * H, gen, ("input_layernorm", "hidden_norm", "post_attention_layernorm")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


# -- the reference: full-sequence attention, written from the layout's description ---------------
def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x [n, heads, HD]
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2).float() / HD))
    f = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    return x * cos + torch.cat([-x[..., HD // 2 :], x[..., : HD // 2]], -1) * sin


def _ref_layer(t: dict, p: str, x: torch.Tensor, attn_in: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    q = _rope((attn_in @ t[f"{p}.self_attn.q_proj.weight"].T).view(n, HEADS, HD), pos)
    k = _rope((attn_in @ t[f"{p}.self_attn.k_proj.weight"].T).view(n, KV, HD), pos)
    v = (attn_in @ t[f"{p}.self_attn.v_proj.weight"].T).view(n, KV, HD)
    k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1) @ t[f"{p}.self_attn.o_proj.weight"].T
    x = x + a
    m = _rms(x, t[f"{p}.post_attention_layernorm.weight"])
    gate, up = m @ t[f"{p}.mlp.gate_proj.weight"].T, m @ t[f"{p}.mlp.up_proj.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ t[f"{p}.mlp.down_proj.weight"].T


def reference_drafts(target_dir: Path, head_dir: Path, kind: str, tokens: list[int], k: int) -> list[int]:
    """The head's greedy drafts after ``tokens`` (prompt + the target's first token)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    t = load_file(str(head_dir / "model.safetensors"))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = target(torch.tensor([tokens[:-1]]), output_hidden_states=True)
        embed, lm_head = target.model.embed_tokens.weight, target.lm_head.weight
        if kind == "eagle":
            feats = out.hidden_states[-1][0]  # [P, H] final, normed
        else:  # the streams entering layers 0, 1, 1
            feats = torch.cat([out.hidden_states[i][0] for i in (0, 1, 1)], -1) @ t["fc.weight"].T
        seq, drafts = list(tokens[1:]), []
        for _ in range(k):
            n = len(seq)
            emb, pos = embed[torch.tensor(seq)], torch.arange(n)
            if kind == "eagle":
                x = torch.cat([emb, feats], -1) @ t["fc.weight"].T + t["fc.bias"]
                x = _ref_layer(t, "layers.0", x, x, pos)
                logits = x[-1] @ lm_head.T
            else:
                attn_in = torch.cat([_rms(emb, t["midlayer.input_layernorm.weight"]),
                                     _rms(feats, t["midlayer.hidden_norm.weight"])], -1)  # fmt: skip
                x = _ref_layer(t, "midlayer", feats, attn_in, pos)
                d = int((_rms(x[-1], t["norm.weight"]) @ t["lm_head.weight"].T).argmax())
                logits = torch.full((VOCAB,), float("-inf"))
                logits[d + int(t["d2t"][d])] = 0.0
            drafts.append(int(logits.argmax()))
            seq.append(drafts[-1])
            feats = torch.cat([feats, x[-1:]])  # the head's own output feeds the next row
    return drafts


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_head_proposes_its_argmax_and_keeps_greedy_output(tiny_model_dir, tmp_path, kind) -> None:
    target = tiny_model_dir("llama")
    head = write_head(tmp_path / kind, kind)
    spec = {"method": kind, "model": str(head), "num_speculative_tokens": 3}
    llm = LLM(str(target), speculative_config=spec, **OPTIONS)
    prompt = random_prompts(1, seed=21, low=50, high=60)[0]  # two prefill chunks (40-token steps)
    engine = llm.llm_engine
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0))
    assert engine.step() == []  # the first chunk: the head keeps its last row's feature for the next
    out = engine.step()  # the last chunk samples the first token, the head drafts the next 3
    first = out[0].outputs[0].token_ids[0]
    assert engine.proposer._drafts["r"] == reference_drafts(target, head, kind, [*prompt, first], 3)
    for _ in range(2):  # after verify steps (drafts accepted or rolled back) the head caught up exactly
        tokens = engine.step()[0].outputs[0].token_ids
        assert engine.proposer._drafts["r"] == reference_drafts(target, head, kind, [*prompt, *tokens], 3)

    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, seed=9, low=5, high=60)]  # chunked at 40
    params = SamplingParams(max_tokens=14, temperature=0)
    want = LLM(str(target), **OPTIONS).generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert sum(o.metrics.num_draft_tokens for o in got) > 0


def test_a_head_for_another_target_is_refused(tiny_model_dir, tmp_path) -> None:
    target = tiny_model_dir("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    head = write_head(tmp_path / "eagle", "eagle")
    with pytest.raises(ValueError, match="is not a eagle head for this target: its hidden size 64"):
        LLM(str(target), speculative_config={"method": "eagle", "model": str(head), "num_speculative_tokens": 2},
            **OPTIONS)  # fmt: skip
