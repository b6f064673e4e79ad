"""KV-cache compaction inside vLLM: a request's prompt KV cache compacted after its prefill by the KV method
it asks for (:mod:`mmrag.kernels.methods`: LOOK-M, random, recent-window, attention-score eviction), its
tail blocks freed.

Not a model class: vLLM takes these through ``scheduler_cls`` and ``worker_cls``
(:func:`mmrag.serving.engine.args.kv_compaction_engine_kwargs` sets both when ``compression.lookm.enabled``).

- :mod:`.plan`: which requests are compacted, by which method, to how many entries (no vLLM import);
- :mod:`.scheduler`: frees the tail blocks and sizes later allocations by the compacted length;
- :mod:`.worker`: has the method score, keep and merge; writes the compacted entries; physical slots afterwards.
"""
