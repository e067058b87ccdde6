"""A CPU model runner that runs the model in ONNX Runtime (``platform_options={"onnx_model": ...}``).

Why it exists: on a small CPU one stream of a small quantized model is bound by per-op overhead
and int4 matmul speed, and ONNX Runtime's CPU kernels (``MatMulNBits`` with int8 activations,
``GroupQueryAttention``) decode the bundled SmolLM2 Q4_1 export ~1.5x faster than llama.cpp and
~2.8x faster than kvik's torch path on the same 2-core machine (docs/benchmarks.md). So kvik offers
it as an optional engine for its CPU platform: scheduling, sampling, logprobs, structured output,
stop strings and the server stay kvik's; only the forward pass moves to ONNX Runtime.

The model is a folder ``kvik export onnx`` wrote (ONNX Runtime GenAI's layout: ``input_ids``,
``attention_mask``, ``past_key_values.N.key/value`` in, ``logits`` and ``present.N.key/value`` out),
or ``"auto"``: this model exported once (``--precision auto``: int4 for a quantized source, else
fp32) into kvik's cache folder and reused by later starts.

Each request keeps its own K/V as numpy arrays with room to grow, bound through an IOBinding as both
the graph's ``past`` input and its ``present`` output: ``GroupQueryAttention`` sees the one buffer and
writes the new positions into it in place, instead of copying the whole past into a new output each
call (7% of a SmolLM2 token at ~150 positions, more with longer contexts). The scheduler's paged blocks
only count them. A prompt chunk runs as its own call; the requests decoding one token each run as one
batch, their K/V rows right-padded (``GroupQueryAttention`` takes each row's length from the attention
mask, so a row's logits are bit-identical to running it alone; rows of very unlike lengths run as separate
batches, :func:`decode_groups`), and a batch's K/V stays stacked while the same requests keep decoding.
What follows from keeping K/V per request:

* no prefix-cache hits (a new request cannot start from blocks another request wrote); the engine
  turns prefix caching off for this runner (``supports_prefix_caching``);
* no LoRA, speculative decoding, pooling, deterministic mode or FP8 KV cache: those need kvik's
  own modelling code, and the engine refuses them with this runner.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kvik.engine import progress
from kvik.models.disk_cache import cache_entry, write_folder_atomically
from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.worker.interface import StepHandle
from kvik.worker.kit import StepLayout
from kvik.worker.torch_runner import TorchModelRunner
from torch import nn

from kvik_cpu.platform import CPUOptions

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

AUTO = "auto"
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# A decode batch pads every row to its longest. A row joins a batch while the batch's padded positions stay
# within PADDING_LIMIT times the positions its rows hold, plus PADDING_SLACK: one long request decoding beside
# many short ones then runs apart instead of making every short row as long as itself, and requests of like
# lengths (the usual mix) stay one batch, one call.
PADDING_LIMIT = 1.5
PADDING_SLACK = 512


def decode_groups(lengths: list[int]) -> list[list[int]]:
    """The decode rows (indices into ``lengths``, their K/V positions) split into batches, longest first, each
    batch's indices in their original order."""
    groups: list[list[int]] = []
    held: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if (
            groups
            and (len(groups[-1]) + 1) * lengths[groups[-1][0]]
            <= PADDING_LIMIT * (held[-1] + lengths[i]) + PADDING_SLACK
        ):
            groups[-1].append(i)
            held[-1] += lengths[i]
        else:
            groups.append([i])
            held.append(lengths[i])
    return [sorted(group) for group in groups]


@dataclass(frozen=True, slots=True)
class OnnxDecoder:
    """What the runner needs from an export's ``genai_config.json`` (its ``model.decoder`` section)."""

    model_file: Path
    num_layers: int
    num_kv_heads: int
    head_size: int
    past_names: tuple[str, ...]  # per layer key, then value: the graph's K/V inputs
    present_names: tuple[str, ...]  # the matching outputs, in the same order

    @classmethod
    def read(cls, folder: Path) -> OnnxDecoder:
        path = folder / "genai_config.json"
        try:
            decoder = json.loads(path.read_text())["model"]["decoder"]
            inputs, outputs = decoder["inputs"], decoder["outputs"]
            layers = int(decoder["num_hidden_layers"])
            past = tuple(
                name % i for i in range(layers) for name in (inputs["past_key_names"], inputs["past_value_names"])
            )
            present = tuple(
                name % i
                for i in range(layers)
                for name in (outputs["present_key_names"], outputs["present_value_names"])
            )
            return cls(folder / decoder["filename"], layers, int(decoder["num_key_value_heads"]),
                       int(decoder["head_size"]), past, present)  # fmt: skip
        except FileNotFoundError:
            raise ValueError(
                f"onnx_model={str(folder)!r} is not an ONNX Runtime GenAI model folder (no genai_config.json); "
                "write one with `kvik export onnx`, or pass onnx_model='auto'"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} does not describe a decoder kvik can run ({type(exc).__name__}: {exc})") from None


def _capacity(needed: int, held: int = 0) -> int:
    """Positions to allocate for K/V that must hold ``needed``: half as much again as it held before (so a
    growing sequence copies its K/V O(log n) times), in whole 128-position steps."""
    want = max(needed, held + held // 2)
    return -(-want // 128) * 128


@dataclass(slots=True)
class _Sequence:
    """One request's K/V: per past input a [1, kv_heads, capacity, head_size] array whose first ``length``
    positions are filled."""

    kv: list[np.ndarray]
    length: int


@dataclass(slots=True)
class _DecodeBatch:
    """The K/V of requests the last batched decode step ran together, one row each, right-padded to the longest.

    ``GroupQueryAttention`` reads each row's length from the attention mask and appends the new token at
    that row's own end, so a row's logits are bit-identical to running it alone; while the same requests
    decode step after step, each step's ``present`` outputs are the next step's inputs as they are.
    """

    ids: list[str]
    lengths: np.ndarray  # [rows] positions each row holds
    kv: list[np.ndarray]  # per past input [rows, kv_heads, capacity >= max(lengths), head_size]
    dead: set[str] = field(default_factory=set)  # rows of requests that finished, left or were preempted

    def live_row(self, request_id: str) -> int | None:
        """The request's row, or None when it has none here (or its row is dead)."""
        if request_id in self.dead or request_id not in self.ids:
            return None
        return self.ids.index(request_id)

    def row_kv(self, row: int) -> list[np.ndarray]:
        """Views of one row's K/V, [kv_heads, length, head_size] per past input."""
        length = int(self.lengths[row])
        return [kv[row, :, :length] for kv in self.kv]


class _LogitsAsHidden(nn.Module):
    """The runner's stand-in for a torch model: the ONNX graph ends in the lm_head, so the rows
    ``run_model`` returns are already logits and the sampler's ``compute_logits`` passes them on."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()


def exported_model(model_path: str, trust_remote_code: bool = False) -> Path:
    """``model_path`` exported once with ``kvik export onnx --precision auto`` into kvik's cache folder."""
    import onnxruntime_genai
    from kvik.entrypoints.export_onnx import EXPORT_LAYOUT, export_onnx

    source = Path(model_path)
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    folder = cache_entry("onnx", (str(source.resolve()), stamp, onnxruntime_genai.__version__, EXPORT_LAYOUT))
    if (folder / "genai_config.json").is_file():
        return folder

    def export(staging: Path) -> None:
        staging.rmdir()  # export_onnx wants a new (or empty) folder and makes it
        report = export_onnx(str(source), staging, verify=False, trust_remote_code=trust_remote_code)
        logger.info("%s", report.summary().replace(str(staging), str(folder)))

    with progress.step(f"exporting the model to ONNX (once; cached in {folder})"):
        write_folder_atomically(folder, export)
    if not (folder / "genai_config.json").is_file():
        raise RuntimeError(f"could not write the ONNX export to {folder} (see the log); set KVIK_CACHE_DIR")
    return folder


class OnnxRuntimeRunner(TorchModelRunner):
    """Runs each scheduled request's tokens through an ONNX Runtime session (see the module docstring)."""

    supports_async_scheduling = False  # the device is this thread: nothing to overlap
    supports_speculative_decoding = False
    supports_drafters = False
    supports_pooling = False
    supports_lora = False
    supports_deterministic = False
    supports_prefix_caching = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.config.platform_options
        assert isinstance(options, CPUOptions) and options.onnx_model
        self.onnx_model = options.onnx_model
        self.num_threads = options.num_threads
        self.session: ort.InferenceSession | None = None
        self.decoder: OnnxDecoder | None = None
        self.kv_dtype: type = np.float32
        self._vocab = 0  # the logits' width (the graph's "logits" output)
        self._sequences: dict[str, _Sequence] = {}  # requests' K/V outside the decode batch
        self._batches: list[_DecodeBatch] = []  # the decode batches of the last batched step
        self._binding: ort.IOBinding | None = None
        self._bound_kv: list[np.ndarray] | None = None  # the K/V buffers bound as past and present

    # -- loading ------------------------------------------------------------------------
    def load_model(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("onnx_model needs ONNX Runtime: pip install 'kvik[onnx]'") from None
        if self.onnx_model == AUTO:
            folder = exported_model(self.config.model, self.config.trust_remote_code)
        else:
            folder = Path(self.onnx_model).expanduser()
        decoder = OnnxDecoder.read(folder)
        self._check_matches(decoder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.num_threads
        opts.inter_op_num_threads = 1
        with progress.step(f"loading {decoder.model_file.name} into ONNX Runtime"):
            session = ort.InferenceSession(str(decoder.model_file), opts, providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in session.get_inputs()}
        names = {o.name for o in session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask", *decoder.past_names) if n not in types]
        missing += [n for n in ("logits", *decoder.present_names) if n not in names]
        if missing:
            raise ValueError(f"{decoder.model_file} lacks the inputs/outputs {missing[:4]} its genai_config.json names")
        self.kv_dtype = _NUMPY_DTYPES.get(types[decoder.past_names[0]], np.float32)
        self.session, self.decoder = session, decoder
        self._binding, self._bound_kv = session.io_binding(), None
        self._vocab = int(session.get_outputs()[[o.name for o in session.get_outputs()].index("logits")].shape[-1])
        self.model = _LogitsAsHidden()
        self.attn_layers = []
        logger.info("running %s in ONNX Runtime %s (%d threads)", decoder.model_file, ort.__version__, self.num_threads)

    def _check_matches(self, decoder: OnnxDecoder) -> None:
        """The export must be this model: the same layers and K/V heads (the tokenizer and limits are kvik's)."""
        mc = self.model_config
        ours = (mc.num_layers, mc.num_kv_heads, mc.head_dim)
        theirs = (decoder.num_layers, decoder.num_kv_heads, decoder.head_size)
        if ours != theirs:
            raise ValueError(
                f"the ONNX model in {decoder.model_file.parent} has (layers, kv heads, head size) {theirs}, but "
                f"{self.config.model} has {ours}: export this model (`kvik export onnx`) or pass onnx_model='auto'"
            )

    def weight_bytes(self) -> int:
        """The export's files (ONNX Runtime holds the initializers in memory)."""
        if self.decoder is None:
            return 0
        folder = self.decoder.model_file.parent
        return sum(p.stat().st_size for p in folder.glob(f"{self.decoder.model_file.name}*"))

    def kv_block_bytes(self, block_size: int) -> int:
        """What a block's tokens hold in the per-request K/V values (K and V, every layer)."""
        mc = self.model_config
        item = np.dtype(self.kv_dtype).itemsize
        return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * item * block_size

    # -- execution ----------------------------------------------------------------------
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        for rid in (*scheduler_output.finished_request_ids, *scheduler_output.preempted_request_ids):
            self._drop(rid)
        return super().execute_async(scheduler_output)

    def run_dummy_step(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        try:
            return super().run_dummy_step(scheduled)
        finally:
            for request in scheduled:
                self._drop(request.request_id)

    def prepare_inputs(self, layout: StepLayout) -> StepLayout:  # type: ignore[override]
        """The layout as it is: the tokens go to ONNX Runtime from host memory."""
        return layout

    def run_model(self, inputs: StepLayout) -> torch.Tensor:  # type: ignore[override]
        """Logits for every scheduled token, [num_tokens, vocab] (the graph computes them all).

        Requests decoding one token each run as batches (:func:`decode_groups`); prompt chunks, and a decode
        row with no batch to join, run one request per call.
        """
        layout = inputs
        scheduled, starts = layout.scheduled, layout.query_start_loc
        decodes = [i for i, r in enumerate(scheduled) if len(r.token_ids) == 1 and r.start_pos > 0]
        groups = [[decodes[j] for j in group] for group in decode_groups([scheduled[i].start_pos for i in decodes])]
        groups = [group for group in groups if len(group) > 1]
        pieces: dict[int, np.ndarray] = {}
        batches = self._arrange([[scheduled[i] for i in group] for group in groups])
        for group, batch in zip(groups, batches, strict=True):
            rows = self._forward_batch(batch, [scheduled[i] for i in group], layout.token_ids[starts[group]])
            pieces.update(zip(group, rows, strict=True))
        for i, request in enumerate(scheduled):
            if i not in pieces:
                pieces[i] = self._forward(request, layout.token_ids[starts[i] : starts[i + 1]])
        if len(pieces) == 1:
            return torch.from_numpy(pieces[0])
        return torch.from_numpy(np.concatenate([pieces[i] for i in range(len(scheduled))]))

    def _run(self, token_ids: np.ndarray, mask: np.ndarray, kv: list[np.ndarray]) -> np.ndarray:
        """One call of the graph; returns the logits [rows, tokens, vocab]. ``kv`` (one buffer per past input,
        its capacity at least the mask's width) is the call's past and its present: the new positions are
        written into it."""
        import onnxruntime as ort

        assert self.session is not None and self.decoder is not None and self._binding is not None
        binding = self._binding
        if self._bound_kv is not kv:
            for past, present, buffer in zip(self.decoder.past_names, self.decoder.present_names, kv, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)  # the numpy memory itself, no copy
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bound_kv = kv  # keeps the buffers alive while bound
        logits = np.empty((*token_ids.shape, self._vocab), np.float32)
        binding.bind_cpu_input("input_ids", token_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits

    def _buffers(self, rows: int, capacity: int) -> list[np.ndarray]:
        """Zeroed K/V for ``rows`` sequences of ``capacity`` positions, one array per past input."""
        assert self.decoder is not None
        shape = (rows, self.decoder.num_kv_heads, capacity, self.decoder.head_size)
        return [np.zeros(shape, self.kv_dtype) for _ in self.decoder.past_names]

    def _grown(self, kv: list[np.ndarray], filled: int, needed: int) -> list[np.ndarray]:
        """``kv`` if it holds ``needed`` positions, else a larger copy of its first ``filled``."""
        held = int(kv[0].shape[2])
        if needed <= held:
            return kv
        bigger = self._buffers(int(kv[0].shape[0]), _capacity(needed, held))
        for new, old in zip(bigger, kv, strict=True):
            new[:, :, :filled] = old[:, :, :filled]
        return bigger

    def _forward(self, request: ScheduledRequest, token_ids: np.ndarray) -> np.ndarray:
        """One request's new tokens after its stored K/V; returns [tokens, vocab] logits."""
        seq = self._take(request)
        total = (0 if seq is None else seq.length) + len(token_ids)
        if seq is None:
            seq = _Sequence(self._buffers(1, _capacity(total)), 0)
        seq.kv = self._grown(seq.kv, seq.length, total)
        ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(1, -1)
        logits = self._run(ids, np.ones((1, total), dtype=np.int64), seq.kv)
        seq.length = total
        self._sequences[request.request_id] = seq
        return logits.reshape(len(token_ids), -1)

    def _forward_batch(
        self, batch: _DecodeBatch, requests: list[ScheduledRequest], token_ids: np.ndarray
    ) -> list[np.ndarray]:
        """One token for each of ``requests`` (the rows of ``batch``) in one call; returns each one's [1, vocab]
        logits."""
        starts = np.fromiter((r.start_pos for r in requests), dtype=np.int64, count=len(requests))
        if not np.array_equal(batch.lengths, starts):
            i = int(np.flatnonzero(batch.lengths != starts)[0])
            raise self._lost(requests[i], int(batch.lengths[i]))
        longest = int(batch.lengths.max())
        batch.kv = self._grown(batch.kv, longest, longest + 1)
        batch.lengths = batch.lengths + 1
        mask = (np.arange(longest + 1) < batch.lengths[:, None]).astype(np.int64)
        logits = self._run(np.ascontiguousarray(token_ids, dtype=np.int64).reshape(-1, 1), mask, batch.kv)
        return list(logits.reshape(len(requests), 1, -1))

    def _arrange(self, groups: list[list[ScheduledRequest]]) -> list[_DecodeBatch]:
        """This step's decode batches, one per group: the last step's batch where it holds exactly the group's
        rows, else a new one stacked from the requests' K/V (copying each once: rows of the last step's
        batches are read in place). Rows of the last step's batches that no batch takes now go to their
        requests' own arrays."""
        old, self._batches = self._batches, []
        unused = list(old)
        batches: list[_DecodeBatch | None] = []
        for group in groups:
            ids = [r.request_id for r in group]
            same = next((b for b in unused if b.ids == ids and not b.dead), None)
            if same is not None:
                unused.remove(same)
            batches.append(same)
        rows = {rid: (b, row) for b in unused for row, rid in enumerate(b.ids) if rid not in b.dead}
        for k, group in enumerate(groups):
            if batches[k] is not None:
                continue
            sources: list[tuple[list[np.ndarray], int]] = []  # per request: [kv_heads, length, head_size] arrays
            for request in group:
                found = rows.pop(request.request_id, None)
                if found is not None:
                    batch, row = found
                    sources.append((batch.row_kv(row), int(batch.lengths[row])))
                    continue
                seq = self._sequences.pop(request.request_id, None)
                if seq is None:
                    raise self._lost(request, None)
                sources.append(([kv[0, :, : seq.length] for kv in seq.kv], seq.length))
            lengths = np.array([length for _, length in sources], dtype=np.int64)
            batches[k] = _DecodeBatch([r.request_id for r in group], lengths, self._stacked(sources))
        for rid, (batch, row) in rows.items():
            self._sequences[rid] = self._copied_out(batch, row)
        self._batches = [b for b in batches if b is not None]
        return self._batches

    def _stacked(self, sources: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
        """New K/V buffers holding one row per source (its [kv_heads, length, head_size] array per past input,
        and its length), right-padded with zeros, with room for each row's next token."""
        kv = self._buffers(len(sources), _capacity(max(length for _, length in sources) + 1))
        for j, stacked in enumerate(kv):
            for row, (arrays, length) in enumerate(sources):
                stacked[row, :, :length] = arrays[j]
        return kv

    def _copied_out(self, batch: _DecodeBatch, row: int) -> _Sequence:
        """A row of a decode batch as a request's own K/V, with room for its next token."""
        length = int(batch.lengths[row])
        return _Sequence(self._stacked([(batch.row_kv(row), length)]), length)

    def _take(self, request: ScheduledRequest) -> _Sequence | None:
        """Remove and return the request's stored K/V (None for a request starting at position 0); a row
        of a decode batch is copied out and marked dead there (the next batched step re-stacks)."""
        seq = self._sequences.pop(request.request_id, None)
        for batch in self._batches:
            row = batch.live_row(request.request_id)
            if row is not None:
                seq = self._copied_out(batch, row)
                batch.dead.add(request.request_id)
                break  # a request has a live row in one batch at most
        if request.start_pos == 0:
            return None
        if seq is None or seq.length != request.start_pos:
            raise self._lost(request, None if seq is None else seq.length)
        return seq

    def _drop(self, request_id: str) -> None:
        self._sequences.pop(request_id, None)
        for batch in self._batches:
            if request_id in batch.ids:
                batch.dead.add(request_id)

    @staticmethod
    def _lost(request: ScheduledRequest, held: int | None) -> RuntimeError:
        what = "holds no K/V for it" if held is None else f"holds {held} positions of K/V for it"
        return RuntimeError(
            f"request {request.request_id!r} resumes at position {request.start_pos}, but the ONNX Runtime runner "
            f"{what} (a prefix-cache hit or a lost step; this runner keeps K/V per request)"
        )

    def shutdown(self) -> None:
        self._sequences.clear()
        self._batches = []
        self._binding = self._bound_kv = None
        self.session = None
        super().shutdown()
