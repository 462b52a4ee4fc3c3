"""tokenmill router: one OpenAI endpoint over many `tokenmill serve` replicas.

replicas.py (who is there, their health and load), prefix_index.py (what each has cached, in
the engine's block hashes), policy.py (the scored choice, pure), rollout.py (canary split and
automatic plan, pure), prompts.py (the replicas' tokenizer), proxy.py (the HTTP front),
local.py (a supervised one-box fleet), metrics.py, settings.py, run.py (wiring).
"""
