"""Tiny random-weight checkpoints built offline, for tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process
on a small built-in corpus, the weights are random with a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks. "
    "Continuous batching admits new requests while others decode. Hello world! How are you today? "
    "Once upon a time there was a small language model that lived on a CPU. 0123456789 "
    "Prefix caching shares blocks between requests with the same prompt. Héllo wörld — naïve café ☕ 日本語 "
    "def main():\n    print('hello')\n\nSystem: you are a helpful assistant. User: tell me a story. "
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A PreTrainedTokenizerFast with BOS/EOS/pad and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small transformers config of ``arch`` (a key of :data:`ARCHITECTURES`)."""
    import transformers

    config_cls_name, arch_name = ARCHITECTURES[arch]
    config_cls = getattr(transformers, config_cls_name)
    values: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        values["rope_theta"] = 10000.0
    values.update(overrides)
    config = config_cls(**values)
    config.architectures = [arch_name]
    return config


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    dtype: str = "float32",
    seed: int = 0,
    shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight ``arch`` checkpoint with a tokenizer to ``path``.

    Returns the directory. ``shard_size`` (e.g. ``"50KB"``) writes a sharded
    checkpoint with ``model.safetensors.index.json``.
    """
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    tokenizer = build_tokenizer(config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.vocab_size}")
    torch.manual_seed(seed)
    model_cls = getattr(transformers, ARCHITECTURES[arch][1])
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    # Random init with std 0.02 makes near-uniform logits; widen it so greedy
    # decoding is not a coin toss between ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
            elif "norm" in name and arch not in ("llama", "mistral", "qwen2"):
                # Norms initialise to a constant, which would hide a misplaced one (the first three
                # architectures keep their original checkpoints, which other tests pin).
                param.add_(torch.randn_like(param) * 0.1)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    (path / "kvik_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return path


def write_checkpoint(path: str | Path, config: dict[str, Any], weights: dict[str, Any], vocab_size: int = 512) -> Path:
    """Write ``config`` (config.json contents), ``weights`` (Hugging Face-named tensors) and kvik's tiny
    tokenizer to ``path``: a test checkpoint for an architecture transformers does not know.

    ``config["architectures"]`` names the class your plugin registers; ``model_type`` must be one
    transformers can parse (e.g. ``"llama"``) so ``AutoConfig`` reads the hyper-parameters.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    if len(tokenizer) > int(config.get("vocab_size", vocab_size)):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.get('vocab_size')}")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return path
