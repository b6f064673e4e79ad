"""LOOK-M inside vLLM: a request's prompt KV cache compacted after its prefill, its tail blocks freed.

Not a model class: vLLM takes these through ``scheduler_cls`` and ``worker_cls``
(:func:`mmrag.serving.engine.vllm_engine.lookm_engine_kwargs` sets both from ``compression.lookm``).

- :mod:`.budget`: which requests are compacted and to how many entries (no vLLM import);
- :mod:`.scheduler`: frees the tail blocks and sizes later allocations by the compacted length;
- :mod:`.worker`: scores, keeps, merges and writes the compacted entries; physical slots afterwards.
"""
