"""vLLM code that should run unchanged: prompt dicts, StructuredOutputsParams, engine options
kvik lacks at their "off" value, chat options, per-request processors, truncation, extra_args."""

from __future__ import annotations

import warnings

import pytest
import torch
from kvik import LLM, SamplingParams, StructuredOutputsParams
from kvik.config import EngineConfig
from kvik.inputs import parse_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), device="cpu", num_kv_blocks=128, max_model_len=256)


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


# -- 13: prompt shapes ----------------------------------------------------------------------
def test_text_and_tokens_prompt_dicts_match_plain_prompts(llm):
    ids = llm.get_tokenizer().encode("The quick brown fox")
    plain = _ids(llm.generate(["The quick brown fox", ids], GREEDY, use_tqdm=False))
    dicts = _ids(llm.generate([{"prompt": "The quick brown fox"}, {"prompt_token_ids": ids}], GREEDY))
    assert dicts == plain and plain[0] == plain[1]
    assert _ids(llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY)) == plain[:1]
    assert _ids(llm.generate({"prompt_token_ids": ids}, GREEDY)) == plain[:1]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"prompt": "hi", "multi_modal_data": {"image": object()}}, "multi_modal_data is not supported"),
        ({"text": "hi"}, "needs 'prompt'"),
        ([1.5, 2], "must be a string, a list of token ids"),
    ],
)
def test_bad_prompt_shapes_are_clear_errors(prompts, message):
    with pytest.raises((TypeError, ValueError), match=message):
        parse_prompts(prompts)


# -- 14: structured outputs ------------------------------------------------------------------
def test_structured_outputs_params_is_the_guided_constraint():
    so = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(structured_outputs=so)
    assert params.guided == ("choice", ["yes", "no"])
    assert params.clone(max_tokens=3).structured_outputs == so
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="not supported yet"):
        StructuredOutputsParams(json={}, whitespace_pattern=r"\s")


def test_guided_fields_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="structured_outputs"):
        params = SamplingParams(guided_regex="[ab]+")
    assert params.structured_outputs == StructuredOutputsParams(regex="[ab]+")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params.clone(seed=1)  # a copy does not warn again


def test_structured_outputs_constrains_generation(llm):
    pytest.importorskip("xgrammar")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=0,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))  # fmt: skip
    texts = [o.outputs[0].text for o in llm.generate(["Pick one:"] * 3, params)]
    assert set(texts) <= {"alpha", "beta"}


# -- 15: vLLM engine options at their "off" value --------------------------------------------
def test_vllm_engine_options_at_off_values_are_accepted():
    config = EngineConfig.from_kwargs(
        model="m", tensor_parallel_size=1, pipeline_parallel_size=1, swap_space=4, disable_log_stats=True,
        kv_cache_dtype="auto", enable_lora=False, trust_remote_code=False,
    )  # fmt: skip
    assert config.model == "m"


@pytest.mark.parametrize(("option", "value"), [("data_parallel_size", 2), ("enable_prompt_adapter", True),
                                               ("data_parallel_size", True)])  # fmt: skip
def test_vllm_engine_options_kvik_lacks_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=rf"not supported by kvik yet: {option}={value!r}"):
        EngineConfig.from_kwargs(**{option: value})


@pytest.mark.parametrize("value", [True, 0, "2"])
def test_parallel_sizes_are_checked(value):
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be"):
        EngineConfig.from_kwargs(tensor_parallel_size=value)


def test_a_real_typo_is_still_an_unknown_option():
    with pytest.raises(TypeError, match=r"unknown engine option.*tensor_paralel_size"):
        EngineConfig.from_kwargs(tensor_paralel_size=1)


# -- 16: chat options, processors, truncation, extra_args ------------------------------------
def test_chat_passes_template_kwargs_and_tools(llm):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if tools %}TOOLS {{ tools | length }}\n{% endif %}{% if shout %}LOUD\n{% endif %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    ids = llm.apply_chat_template(messages, chat_template=template, tools=[{"type": "function"}],
                                  chat_template_kwargs={"shout": True})  # fmt: skip
    assert llm.get_tokenizer().decode(ids) == "user: hello\nTOOLS 1\nLOUD\nassistant:"
    out = llm.chat(messages, GREEDY, chat_template=template, chat_template_kwargs={"shout": True}, use_tqdm=False)
    assert out[0].prompt_token_ids == llm.apply_chat_template(messages, chat_template=template,
                                                              chat_template_kwargs={"shout": True})  # fmt: skip


def test_continue_final_message_leaves_the_last_message_open(llm):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    ids = llm.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert llm.get_tokenizer().decode(ids).endswith("<|im_start|>assistant\nOnce upon")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(messages, continue_final_message=True)


def test_image_parts_in_chat_are_refused(llm):
    with pytest.raises(ValueError, match="text content parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_per_request_logits_processors_in_both_forms(llm):
    seen: list[tuple[int, int]] = []

    def force_seven(output_ids, logits):
        seen.append((len(output_ids), logits.shape[0]))
        banned = torch.full_like(logits, float("-inf"))
        banned[7] = 0.0
        return banned

    def force_nine(prompt_ids, output_ids, logits):
        assert prompt_ids == [5, 6, 7]
        logits[:] = float("-inf")
        logits[9] = 0.0
        return logits

    out = llm.generate([[5, 6, 7], [5, 6, 7], [5, 6, 7]], [
        SamplingParams(max_tokens=4, logits_processors=[force_seven]),
        SamplingParams(max_tokens=4, logits_processors=[force_nine]),
        SamplingParams(max_tokens=4, temperature=0.0),
    ])  # fmt: skip
    assert out[0].outputs[0].token_ids == [7] * 4 and out[1].outputs[0].token_ids == [9] * 4
    assert out[2].outputs[0].token_ids != [7] * 4
    assert [n for n, _ in seen] == [0, 1, 2, 3] and seen[0][1] == 512
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not callable"])


def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(llm):
    prompt = list(range(10, 60))
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, truncate_prompt_tokens=8))
    assert out[0].prompt_token_ids == prompt[-8:]
    direct = llm.generate([prompt[-8:]], SamplingParams(max_tokens=3, temperature=0.0))
    assert out[0].outputs[0].token_ids == direct[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_extra_args_are_carried(llm):
    params = SamplingParams(max_tokens=2, extra_args={"trace": 1})
    assert params.clone().extra_args == {"trace": 1}
    assert llm.generate("hi", params)[0].finished
    with pytest.raises(ValueError, match="extra_args"):
        SamplingParams(extra_args=[1])


def test_use_tqdm_defaults_to_a_progress_bar(llm, capsys):
    llm.generate("hi", SamplingParams(max_tokens=2))
    assert "generating" in capsys.readouterr().err
    llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    assert "generating" not in capsys.readouterr().err
