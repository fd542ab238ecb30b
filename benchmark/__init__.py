"""Evaluation suite: scorers, prompt templates, synthetic tasks and runners (LongBench, InfiniteBench, passkey).

Imports point one way: benchmark code uses `inf_llm` (engine, adapter, config) and nothing in `inf_llm`
imports `benchmark`. The pure parts (metrics, prompts, synthetic, pipeline) import no torch.
"""
