"""tokenmill bench: a load generator for any OpenAI-compatible server.

Client-only: nothing here imports torch at module level, so the benchmark can run on a
machine that only talks to the server. Metric definitions follow `vllm bench serve` so the
figures are comparable with published vLLM numbers.
"""
