"""Whole files or none: every file tokenmill writes for another reader (a kernel cache, a
verified-weights stamp, the router's endpoint list, a batch input, a converted tokenizer) is
written beside its target and renamed over it."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, durable: bool = False) -> None:
    """Readers of `path` see the old file or the new one, never a part of one. The temporary's
    name carries the pid, so processes writing the same path at once (two servers starting)
    never write into each other's. durable: fsync before the rename, for a file acknowledged to
    a client (it must outlive a crash). On an error the temporary is removed and the error
    raised: where the file is only a cache, the caller decides to go on without it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
