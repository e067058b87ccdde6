"""CUDAModelRunner: pinned step inputs, bucketed decode, and (on a GPU) CUDA graphs.

On CPU the runner's input path and its padded ("bucketed") decode steps run
against the generic TorchModelRunner on a tiny random Llama; the bucketed path
uses the triton kernels under Triton's interpreter. CUDA graphs themselves
need a GPU and are checked only there.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from host_cuda_platform import HostCUDAPlatform, register_small_tile_triton
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables, StepLayout
from kvik.worker.torch_runner import TorchModelRunner
from kvik_cuda.inputs import StepInputs
from kvik_cuda.runner import CUDAModelRunner
from kvik_triton_attention.testing import SmallTileTritonAttentionBackend

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")



def _req(rid: str, tokens: list[int], start: int, blocks: list[int], sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(rid, tokens, start, blocks, sample, SamplingParams(temperature=0.0))


def test_step_inputs_match_the_definitions() -> None:
    rng = random.Random(0)
    bs = 4
    inputs = StepInputs(max_tokens=64, max_reqs=8, max_blocks=10, device=torch.device("cpu"))
    for trial in range(20):
        reqs = []
        for i in range(rng.randint(1, 6)):
            start = rng.randint(0, 20)
            n = 1 if trial % 2 else rng.randint(1, 6)
            blocks = rng.sample(range(1, 100), -(-(start + n) // bs) + rng.randint(0, 2))
            reqs.append(_req(f"r{i}", [rng.randint(1, 500) for _ in range(n)], start, blocks))
        pad = 8 if trial % 2 else None  # decode-only steps: also try padding to a bucket
        tables = BlockTables()
        rows = tables.apply(SchedulerOutput(reqs, sum(len(r.token_ids) for r in reqs)))
        layout = StepLayout.build(reqs, tables, rows, bs, buffers=inputs.host, pad_to=pad)
        assert layout.buffers is inputs.host and layout.padded_to == pad
        step = inputs.copy(layout)
        m = step.metadata
        ids = [t for r in reqs for t in r.token_ids]
        pos = [p for r in reqs for p in range(r.start_pos, r.start_pos + len(r.token_ids))]
        slots = [
            r.new_block_ids[p // bs] * bs + p % bs
            for r in reqs
            for p in range(r.start_pos, r.start_pos + len(r.token_ids))
        ]
        extra = (pad or len(reqs)) - len(reqs)
        assert step.input_ids.tolist() == ids + [0] * extra
        assert step.positions.tolist() == pos + [0] * extra
        assert m.slot_mapping.tolist() == slots + [0] * extra  # dummy rows write only the null block
        q = [len(r.token_ids) for r in reqs] + [1] * extra
        assert m.query_start_loc.tolist() == [sum(q[:i]) for i in range(len(q) + 1)]
        assert m.seq_lens.tolist() == [r.start_pos + len(r.token_ids) for r in reqs] + [1] * extra
        assert (m.num_reqs, m.num_tokens, m.max_query_len) == (len(q), sum(q), max(q))
        for i, r in enumerate(reqs):
            nb = -(-(r.start_pos + len(r.token_ids)) // bs)
            assert m.block_tables[i, :nb].tolist() == r.new_block_ids[:nb]
        # Dummy rows have seq_len 1 and read only column 0: the null block. (Columns past
        # this step's longest table may hold older steps' blocks; no seq_len reaches them.)
        assert not m.block_tables[len(reqs) :, 0].any()


def test_step_inputs_give_each_kv_cache_group_its_table_and_slots() -> None:
    """Two KV-cache groups: rows hold each position's two ids side by side; the device buffers give group 0's
    table and slots in the metadata itself and group 1's in its other_kv_groups, padded steps included."""
    bs, groups = 4, 2
    inputs = StepInputs(max_tokens=64, max_reqs=8, max_blocks=10, device=torch.device("cpu"), num_groups=groups)
    for pad in (None, 8):
        reqs = [
            _req("a", [5], 6, [1, 2, 3, 4]),  # positions 0, 1; groups interleaved
            _req("b", [6], 9, [5, 6, 7, 8, 9, 10]),
        ]
        tables = BlockTables(num_groups=groups)
        rows = tables.apply(SchedulerOutput(reqs, 2))
        layout = StepLayout.build(reqs, tables, rows, bs, buffers=inputs.host, pad_to=pad)
        m = inputs.copy(layout).metadata
        assert len(m.all_kv_groups) == 2 and m.for_group(0) is m
        for g, gm in enumerate(m.all_kv_groups):
            assert gm.block_tables[0, :2].tolist() == [1 + g, 3 + g]
            assert gm.block_tables[1, :3].tolist() == [5 + g, 7 + g, 9 + g]
            assert gm.slot_mapping[:2].tolist() == [(3 + g) * bs + 2, (9 + g) * bs + 1]
            assert gm.num_reqs == (pad or 2) and gm.seq_lens is m.seq_lens


def _runner(cls: type[TorchModelRunner], path, manager, **config) -> TorchModelRunner:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(
        model=str(path), dtype="float32", block_size=4, max_num_batched_tokens=64, max_num_seqs=8, **config
    )
    platform = HostCUDAPlatform()
    resolution = resolve_config(cfg, platform, manager)
    runner = cls(resolution.config, resolution.model_config, DEVICE, platform, manager)
    runner.load_model()
    runner.initialize_kv_cache(32)
    return runner


STEPS = [
    [_req("a", list(range(3, 10)), 0, [1, 2]), _req("b", [5, 6, 7, 8, 9], 0, [3, 4])],
    [_req("a", [11], 7, [1, 2]), _req("b", [12], 5, [3, 4])],
    [_req("a", [13], 8, [1, 2, 5]), _req("c", list(range(20, 26)), 0, [6, 7]), _req("b", [14], 6, [3, 4])],
    [_req("c", [30], 6, [6, 7]), _req("a", [31], 9, [1, 2, 5])],
    [_req("b", list(range(40, 44)), 7, [3, 4, 8], sample=False), _req("a", [32], 10, [1, 2, 5])],
]


def _logits(runner: TorchModelRunner) -> list[torch.Tensor]:
    return [runner.compute_logits(SchedulerOutput(step, sum(len(r.token_ids) for r in step))) for step in STEPS]


@pytest.mark.usefixtures("_one_thread")
def test_pinned_input_path_gives_the_generic_runners_logits(kvik_plugin_manager, tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    expected = _logits(_runner(TorchModelRunner, path, kvik_plugin_manager))
    got = _logits(_runner(CUDAModelRunner, path, kvik_plugin_manager, platform_options={"fused_layers": False}))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.usefixtures("_one_thread")
def test_dummy_decodes_between_steps_change_nothing(kvik_plugin_manager, tiny_model_dir) -> None:
    """Graph capture's padded dummy batches (scratch block tables) leave live requests' tables alone."""
    path = tiny_model_dir("llama")
    expected = _logits(_runner(TorchModelRunner, path, kvik_plugin_manager))
    runner = _runner(CUDAModelRunner, path, kvik_plugin_manager, platform_options={"fused_layers": False})
    assert isinstance(runner, CUDAModelRunner)
    held: dict[str, list[int]] = {}  # what the runner has of each table
    got = []
    for step in STEPS:
        sent = []
        for r in step:  # block-table deltas: a request's first step sends its whole table, later ones what it gained
            known = held.get(r.request_id)
            new = r.new_block_ids if known is None else r.new_block_ids[len(known) :]
            held[r.request_id] = list(r.new_block_ids)
            sent.append(
                ScheduledRequest(
                    r.request_id,
                    r.token_ids,
                    r.start_pos,
                    new,
                    r.sample,
                    r.sampling_params,
                    full_block_table=known is None,
                )
            )
        got.append(runner.compute_logits(SchedulerOutput(sent, sum(len(r.token_ids) for r in sent))))
        dummy = runner.copy_dummy_decode(4)
        assert dummy.metadata.num_reqs == 4 and dummy.metadata.max_seq_len_bound == runner.model_config.max_model_len
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms, normed inside attention on decode steps
def test_bucketed_decode_with_triton_and_fused_layers_matches_torch_ref(
    kvik_plugin_manager, tiny_model_dir, arch: str
) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU this needs TRITON_INTERPRET=1 before triton loads (tests/attention_backends set it)")
    register_small_tile_triton(kvik_plugin_manager, "interp_plugin")
    path = tiny_model_dir(arch)
    expected = _logits(_runner(TorchModelRunner, path, kvik_plugin_manager))
    rotated_inside = []
    forward_rotary = SmallTileTritonAttentionBackend.forward_rotary
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SmallTileTritonAttentionBackend, "forward_rotary",
                      lambda self, *args: rotated_inside.append(1) or forward_rotary(self, *args))  # fmt: skip
        runner = _runner(CUDAModelRunner, path, kvik_plugin_manager, attention_backend="triton_interp",
                         platform_options={"fused_layers": True})  # fmt: skip
        assert runner._bucket(STEPS[1]) == (2, 2) and runner._bucket(STEPS[3]) == (2, 2)
        assert runner._bucket(STEPS[2]) is None
        got = _logits(runner)
    layers = runner.model_config.hf_config.num_hidden_layers
    # The two decode-only steps rotate q and k inside attention (on a GPU, in the captured decode graphs).
    assert len(rotated_inside) == 2 * layers if not CUDA else len(rotated_inside) >= layers
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_give_the_same_tokens_as_eager(tiny_model_dir, dtype: str) -> None:
    import kvik

    path = tiny_model_dir("llama", num_hidden_layers=2)
    prompts = [[1 + (7 * i + j) % 400 for j in range(5 + 9 * i)] for i in range(11)]
    params = kvik.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = kvik.LLM(
            model=str(path), device="cuda", dtype=dtype, enforce_eager=eager, max_num_seqs=16, num_kv_blocks=256
        )
        runner = llm.llm_engine.runner if hasattr(llm, "llm_engine") else llm.engine.runner
        assert isinstance(runner, CUDAModelRunner)
        assert bool(runner.graphs) is (not eager)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


def test_step_inputs_follow_block_table_deltas_and_survive_dummy_steps() -> None:
    """Live rows come from the deltas; a runner-internal (scratch-table) step in between changes nothing."""
    bs = 4
    inputs = StepInputs(max_tokens=32, max_reqs=2, max_blocks=8, device=torch.device("cpu"))
    live = BlockTables()

    def table(tables: BlockTables, out: SchedulerOutput) -> list[list[int]]:
        rows = tables.apply(out)
        layout = StepLayout.build(out.scheduled, tables, rows, bs, buffers=inputs.host)
        m = inputs.copy(layout).metadata
        return [m.block_tables[i, : -(-(r.start_pos + 1) // bs)].tolist() for i, r in enumerate(out.scheduled)]

    def delta(rid: str, start: int, ids: list[int], full: bool = False) -> ScheduledRequest:
        return ScheduledRequest(rid, [1], start, ids, True, SamplingParams(), full_block_table=full)

    assert table(live, SchedulerOutput([delta("a", 3, [7], True)], 1)) == [[7]]
    assert table(live, SchedulerOutput([delta("a", 4, [9])], 1)) == [[7, 9]]  # crossed into a new block
    assert table(BlockTables(), SchedulerOutput([_req("capture", [0], 0, [0])], 1)) == [[0]]  # a dummy step
    assert table(live, SchedulerOutput([delta("a", 5, [])], 1)) == [[7, 9]]
    # Preempted, then resumed with a whole new table.
    out = SchedulerOutput([delta("a", 5, [2, 3], True)], 1, preempted_request_ids=["a"])
    assert table(live, out) == [[2, 3]]
    out = SchedulerOutput([delta("b", 1, [5], True)], 1, finished_request_ids=["a"])
    assert table(live, out) == [[5]] and "a" not in live


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_async_scheduling_gives_the_synchronous_outputs(tiny_model_dir) -> None:
    """Graph replays whose input token comes from the previous step's samples on the device."""
    import kvik

    path = tiny_model_dir("llama", num_hidden_layers=2)
    prompts = [[1 + (5 * i + j) % 400 for j in range(3 + 11 * i)] for i in range(12)]
    params = [
        kvik.SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, stop_token_ids=[7, 11], logprobs=1)
        for i in range(len(prompts))
    ]
    params[2] = kvik.SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    outs = {}
    for overlap in (False, True):
        # 40 blocks of 16: the 12 requests do not all fit, so some are preempted with a token in flight.
        llm = kvik.LLM(
            model=str(path), device="cuda", dtype="float32", async_scheduling=overlap, max_num_seqs=16, num_kv_blocks=40
        )
        assert llm.llm_engine.async_scheduling is overlap
        outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("kernel", ["table", "sgmv"])
def test_lora_steps_through_the_triton_kernels_match_the_torch_reference(
    kvik_plugin_manager, tiny_model_dir, tmp_path, monkeypatch, kernel
) -> None:
    """Mixed adapter / base-model steps: the CUDA runner (Triton LoRA kernels, interpreted on CPU) gives
    the generic runner's (torch reference) logits, and the adapters change them. ``sgmv``: every step
    through the tiled kernels, whose tile map is cut once per step (not once per projection)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU this needs TRITON_INTERPRET=1 before triton loads")
    from kvik_cuda import lora_kernels

    built: list[int] = []
    if kernel == "sgmv":
        monkeypatch.setattr(lora_kernels, "CONFIGS", {1: lora_kernels.LoRAKernelConfig(block_n=16, block_k=16)})
        real_build = lora_kernels.build_tile_map

        def counted(slots, block_m, out=None):  # type: ignore[no-untyped-def]
            built.append(slots.shape[0])
            return real_build(slots, block_m, out)

        monkeypatch.setattr(lora_kernels, "build_tile_map", counted)
    from kvik.lora import LoRARequest
    from kvik.testing.tiny_lora import write_random_adapter
    from transformers import AutoConfig

    path = tiny_model_dir("llama")
    hf = AutoConfig.from_pretrained(path)
    loras = [
        LoRARequest("all", 1, str(write_random_adapter(tmp_path / "all", hf, rank=4, std=0.2, dtype="float32"))),
        LoRARequest("qv", 2, str(write_random_adapter(tmp_path / "qv", hf, rank=2, targets=("q_proj", "v_proj"),
                                                      std=0.3, dtype="float32"))),
    ]  # fmt: skip
    lora_of = {"a": loras[0], "b": None, "c": loras[1]}

    def steps(with_lora: bool) -> list[SchedulerOutput]:
        out = []
        for step in STEPS:
            reqs = [
                ScheduledRequest(r.request_id, r.token_ids, r.start_pos, r.new_block_ids, r.sample, r.sampling_params,
                                 lora_request=lora_of[r.request_id] if with_lora else None)
                for r in step
            ]  # fmt: skip
            out.append(SchedulerOutput(reqs, sum(len(r.token_ids) for r in reqs)))
        return out

    options = dict(enable_lora=True, max_loras=2, max_lora_rank=4)
    reference = _runner(TorchModelRunner, path, kvik_plugin_manager, **options)
    cuda = _runner(CUDAModelRunner, path, kvik_plugin_manager, platform_options={"fused_layers": False}, **options)
    assert cuda.lora is not None and isinstance(cuda.lora.wrapped.state.add_lora, lora_kernels.TritonLoRA)
    assert cuda.lora.wrapped.state.project == cuda.lora.wrapped.state.add_lora.project  # shrink beside the base
    want = [reference.compute_logits(s) for s in steps(True)]
    got = [cuda.compute_logits(s) for s in steps(True)]
    if kernel == "sgmv":  # every step has an adapter row: one map each, shared by all its projections
        assert built == [sum(len(r.token_ids) for r in step) for step in STEPS]
    base = [_runner(TorchModelRunner, path, kvik_plugin_manager).compute_logits(s) for s in steps(False)]
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # Row 0 of step 0 is request "a" (adapter "all"); request "b" runs the base model.
    assert not torch.allclose(want[0][0], base[0][0], atol=1e-3)
    torch.testing.assert_close(want[0][1], base[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernel", ["table", "sgmv"])
def test_lora_under_cuda_graphs_gives_the_eager_tokens(tiny_model_dir, tmp_path, monkeypatch, kernel) -> None:
    """``sgmv``: the tiled kernels at every size, so the decode graphs replay over the tile map the
    runner cuts into its persistent buffers each step."""
    import kvik
    from kvik_cuda import lora_kernels

    if kernel == "sgmv":
        monkeypatch.setattr(lora_kernels, "CONFIGS", {1: lora_kernels.LoRAKernelConfig()})
    from kvik.lora import LoRARequest
    from kvik.testing.tiny_lora import write_random_adapter
    from transformers import AutoConfig

    path = tiny_model_dir("llama", num_hidden_layers=2)
    hf = AutoConfig.from_pretrained(path)
    loras = [LoRARequest(f"l{i}", i + 1, str(write_random_adapter(tmp_path / f"l{i}", hf, rank=4 + 4 * i, seed=i,
                                                                   std=0.2, dtype="float32"))) for i in range(3)]  # fmt: skip
    prompts = [[1 + (7 * i + j) % 400 for j in range(5 + 9 * i)] for i in range(9)]
    per_prompt = [None if i % 4 == 3 else loras[i % 3] for i in range(len(prompts))]
    params = kvik.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = kvik.LLM(model=str(path), device="cuda", dtype="bfloat16", enforce_eager=eager, max_num_seqs=16,
                       num_kv_blocks=256, enable_lora=True, max_loras=2, max_lora_rank=16)  # fmt: skip
        runner = llm.llm_engine.runner
        assert bool(runner.lora_graphs) is (not eager)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=per_prompt)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    ("arch", "impl"),
    [("llama", "auto"), ("qwen3", "auto"), ("qwen3_moe", "auto"), ("gemma2", "auto"), ("llama", "transformers")],
)
def test_piecewise_graphs_give_the_eager_bits(tiny_model_dir, arch: str, impl: str) -> None:
    """Prefill and mixed steps replayed as piecewise graphs: the same tokens and logprobs as the same padded
    steps run eagerly (bit for bit), and the same greedy tokens as unpadded eager steps. Also for the Triton
    MoE, Gemma 2's windowed and soft-capped layers, and the transformers fallback's modelling code."""
    import kvik

    path = tiny_model_dir(arch, num_hidden_layers=3)
    # Staggered lengths and a small step budget: steps mix decodes with prompt chunks.
    prompts = [[1 + (7 * i + j) % 400 for j in range(3 + 29 * i)] for i in range(12)]
    params = kvik.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = {}
    for name, eager, limit in (("eager", True, None), ("graphs", False, None), ("unpadded", True, 0)):
        llm = kvik.LLM(model=str(path), device="cuda", dtype="bfloat16", enforce_eager=eager, max_num_seqs=8,
                       max_num_batched_tokens=128, num_kv_blocks=256, model_impl=impl,
                       platform_options={} if limit is None else {"piecewise_max_tokens": limit})  # fmt: skip
        runner = llm.llm_engine.runner
        assert isinstance(runner, CUDAModelRunner)
        assert bool(runner.piecewise_sizes) is (limit is None)
        assert bool(runner.piecewise_graphs) is (name == "graphs")
        results = llm.generate(prompts, params)
        if name == "graphs":
            assert runner.piecewise_replays > 0
        outs[name] = [
            (o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in results
        ]
        del llm
        torch.cuda.empty_cache()
    assert outs["graphs"] == outs["eager"]
    assert [t for t, _ in outs["unpadded"]] == [t for t, _ in outs["graphs"]]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_kv_cache_groups_with_triton_and_cuda_graphs_match_hf(tiny_model_dir, arch: str) -> None:
    """Gemma's sliding and global layers in KV-cache groups on the GPU (Triton attention, decode and piecewise
    CUDA graphs, blocks behind the 8-token window released): float32 greedy tokens equal transformers', eager
    and with graphs, prefix caching and chunked prefill doing work."""
    import kvik
    from kvik.testing.reference import hf_greedy, random_prompts

    path = tiny_model_dir(arch, num_hidden_layers=4 if arch == "gemma2" else 7, head_dim=32,
                          query_pre_attn_scalar=32, sliding_window=8)  # fmt: skip
    base = random_prompts(6, seed=21, low=20, high=90)
    prompts = base + [base[0] + p for p in random_prompts(3, seed=22, low=5, high=30)]
    expected = hf_greedy(path, prompts, 32, device="cuda")
    params = kvik.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for eager in (True, False):
        llm = kvik.LLM(model=str(path), device="cuda", dtype="float32", enforce_eager=eager, block_size=16,
                       max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, num_kv_blocks=512)  # fmt: skip
        engine = llm.llm_engine
        assert len(engine.scheduler.group_windows) > 1
        runner = engine.runner
        assert isinstance(runner, CUDAModelRunner) and bool(runner.graphs) is (not eager)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == expected, f"eager={eager}"
        assert engine.get_stats().prefix_cache_hits > 0
        if not eager:
            assert runner.replays > 0
        del llm, engine, runner
        torch.cuda.empty_cache()
