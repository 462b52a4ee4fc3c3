"""Batch inference: OpenAI batch files in, result files out, resumable and durable.

format.py reads and writes the line format, results.py appends result lines durably and
knows which custom_ids are done, runner.py runs lines through an injected `Execute` (the
server's own handlers, tokenmill.server.batch_calls), store.py and service.py keep the Batch
API's files and batches in SQLite under a data directory. Nothing here knows HTTP or the
engine: both arrive through `Execute`.
"""
