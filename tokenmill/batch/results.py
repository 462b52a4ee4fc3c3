"""Result files written so that a crash at any moment loses nothing and repeats nothing.

Each result line is written, flushed and fsynced before the next one is counted as done, and
the files themselves are the record of what is done: on (re)opening, every whole line names a
finished custom_id, and a torn last line (the process died mid-write) is cut off, so that
request simply runs again. Successes go to the output file, failures to the error file (the
same file when one path is given, as `tokenmill run-batch -o` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenmill.batch.format import is_success


def result_key(result: dict) -> str:
    """What a result line answers: its custom_id, or for an input line that could not run
    (it may have no id, or repeat an earlier line's), its line number."""
    error = result.get("error") or {}
    if error.get("line") is not None:
        return f"#line{error['line']}"
    return result["custom_id"]


def _recover(path: Path) -> list[dict]:
    """The whole lines of a result file, after cutting a torn tail off the file itself."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
            os.fsync(f.fileno())
    return [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]


class ResultFiles:
    def __init__(self, output: Path, errors: Path | None = None):
        self.output = Path(output)
        self.errors = Path(errors) if errors is not None else self.output
        self.done: set[str] = set()
        self.num_completed = 0
        self.num_failed = 0
        for path in dict.fromkeys((self.output, self.errors)):
            path.parent.mkdir(parents=True, exist_ok=True)
            for result in _recover(path):
                self._count(result)
        self._files = {p: open(p, "ab") for p in dict.fromkeys((self.output, self.errors))}

    def _count(self, result: dict) -> None:
        self.done.add(result_key(result))
        if is_success(result):
            self.num_completed += 1
        else:
            self.num_failed += 1

    def is_done(self, key: str) -> bool:
        return key in self.done

    def write(self, result: dict) -> None:
        """Durable before it counts: a result counted done is on disk."""
        if result_key(result) in self.done:
            return  # a line resumed twice never answers twice
        f = self._files[self.output if is_success(result) else self.errors]
        f.write(json.dumps(result, ensure_ascii=False).encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
        self._count(result)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "ResultFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
