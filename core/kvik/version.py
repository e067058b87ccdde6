"""Versions of the kvik distribution and of the plugin contract.

``PLUGIN_API_VERSION`` changes its major number only when a hook or interface
changes meaning; new optional hook arguments and new interface methods with
defaults bump the minor number. A plugin declares the range it supports with a
module attribute ``KVIK_PLUGIN_API = ">=2.0,<3"``.
"""

__version__ = "0.1.0"
# 1.1: QuantizationMethod.apply_with_bias; 1.2: structured-output backends hook;
# 1.3: ModelRunner.execute_async / supports_async_scheduling, ScheduledRequest.num_pending_*
# 2.0 (breaking, see docs/plugins.md "Plugin API 2.0"): ScheduledRequest carries block-table
#     deltas (new_block_ids, full_block_table); the runner kit (kvik.worker.kit) and its hooks;
#     AttentionBackend / AttentionMetadata generic over the array type, dtype names in
#     supported_dtypes / validate(), supports_cuda_graphs, AttentionMetadata.max_seq_len_bound;
#     SamplingBatch / PromptRows in kvik.sample.batch.
# 2.1: tool-parser and reasoning-parser hooks (served by kvik-server)
# 2.2: kvik_register_spec_proposers (speculative decoding), ScheduledRequest.draft_token_ids
# 2.3: QuantizationMethod.validate_device, devices, device_requirements, quantizes_dense_checkpoints
#      kvik_register_executors (kvik.executor.Executor), ModelBuildContext.parallel,
#      Platform.distributed_backend / device_count() / bind_rank()
# 2.4: AttentionBackend.supported_kv_cache_dtypes / k_scale / v_scale / set_kv_scale (FP8 KV cache),
#      AttentionBackend.supports_batch_invariance and ModelRunner.supports_deterministic (deterministic mode),
#      Linear.shard_rows (the rows a merged layer's checkpoint shard fills)
# 2.5: ModelRunner.prefetch_lora (optional: read an admitted request's adapter ahead of its step)
# 2.6: Platform.tensor_parallel_all_reduce (optional faster sum over the tensor-parallel group),
#      Executor.start_profile / stop_profile (torch.profiler on every rank),
#      QuantizationMethod.pack_lm_head (a tied head multiplied by its quantized rows)
# 2.7: ModelRunner.lora_loading (optional: the scheduler holds back requests whose adapter is still being read);
#      AttentionMetadata.max_query_len_bound (a runner's promise for planning, like max_seq_len_bound)
# 2.8: TorchModelRunner.run_draft_decode (optional: replay a drafter's graph-capturable Drafter.decode_pass);
#      RunnerOutput.pooled rows may be 1-D numpy arrays as well as lists
# 2.9: LoRAState.project (optional: a platform computes a LoRA projection whole, e.g. overlapping the delta
#      with the base matmul)
# 2.10: QuantizationMethod.input_row_quantization / apply_quantized_rows and RowQuantization (optional: a method
#      states the row quantization its apply starts with, so a platform's fused kernel can produce the codes)
# 2.11: AttentionBackend.cache_entries (optional: a backend whose blocks order their entries otherwise than
#      kv_cache_shape reads says how to read them back; the FP8 conformance check uses it)
PLUGIN_API_VERSION = "2.11"
