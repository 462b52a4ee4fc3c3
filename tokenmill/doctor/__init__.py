"""tokenmill doctor: why a deployment is slow, idle or expensive, from its own metrics and GPU
counters, and what to change. Readers (recording, gpu) -> a window of evidence -> rules ->
a ranked report."""
