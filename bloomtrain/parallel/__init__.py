"""Parallelism applied to the plain model: the layout and its process groups, tensor parallelism
(megatron-core), the pipeline (DeepSpeed), building a rank's model, the DeepSpeed engine, and the
only CPU-specific code (``cpu.py``)."""
