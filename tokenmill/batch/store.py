"""The Batch API's records in SQLite (stdlib): files and batches, one row each.

File contents live beside the database (files/<id>); a row is written only after its file is
whole on disk, so a crash never leaves a record pointing at half a file. The database is the
truth about a batch's status; its result files are the truth about which lines are done
(tokenmill.batch.results), so the two never have to be updated together.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from tokenmill.files import write_atomic

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, doc TEXT NOT NULL);
"""

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Store:
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        # One connection shared by the HTTP loop and the batch thread, behind a lock.
        self._db = sqlite3.connect(self.dir / "batches.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- files ---------------------------------------------------------------------------
    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        file_id = new_id("file")
        write_atomic(self.path(file_id), content, durable=True)
        return self.register_file(file_id, filename, purpose)

    def register_file(self, file_id: str, filename: str, purpose: str) -> dict:
        """Record a file already whole at path(file_id) (a batch's output or error file)."""
        size = self.path(file_id).stat().st_size if self.path(file_id).exists() else 0
        self._query("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                    (file_id, filename, purpose, size, int(time.time())))
        return self.file(file_id)

    def file(self, file_id: str) -> dict | None:
        rows = self._query("SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?", (file_id,))
        if not rows:
            return None
        fid, filename, purpose, size, created = rows[0]
        return {"id": fid, "object": "file", "bytes": size, "created_at": created, "filename": filename,
                "purpose": purpose, "status": "processed"}

    def files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
              order: str = "desc") -> tuple[list[dict], bool]:
        """A page in upload order (`desc`: newest first), past the file `after` (KeyError when
        there is no such file: a cursor that points nowhere has no page). (page, has_more)."""
        newest_first = order == "desc"
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            rows = self._query("SELECT rowid FROM files WHERE id = ?", (after,))
            if not rows:
                raise KeyError(after)
            where.append("rowid < ?" if newest_first else "rowid > ?")
            args.append(rows[0][0])
        # rowid grows with every insert: upload order, with no tie at the same second.
        rows = self._query("SELECT id FROM files" + (" WHERE " + " AND ".join(where) if where else "")
                           + f" ORDER BY rowid {'DESC' if newest_first else 'ASC'} LIMIT ?", (*args, limit + 1))
        page = [f for f in (self.file(r[0]) for r in rows[:limit]) if f is not None]
        return page, len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        if self.file(file_id) is None:
            return False
        self._query("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)
        return True

    # -- batches -------------------------------------------------------------------------
    def put_batch(self, batch: dict) -> dict:
        """Insert or replace a batch's whole document (a few hundred bytes: simpler than columns)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM batches WHERE id = ?", (batch["id"],)).fetchone()
            seq = row[0] if row else self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0]
            self._db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?)", (batch["id"], seq, json.dumps(batch)))
        return batch

    def update_batch(self, batch_id: str, **changes) -> dict:
        """Change some fields of a batch in one step: the HTTP loop (cancel) and the batch
        thread (progress) both write, and neither may undo the other's change."""
        with self._lock:
            doc = json.loads(self._db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()[0])
            doc.update(changes)
            self._db.execute("UPDATE batches SET doc = ? WHERE id = ?", (json.dumps(doc), batch_id))
        return doc

    def batch(self, batch_id: str) -> dict | None:
        rows = self._query("SELECT doc FROM batches WHERE id = ?", (batch_id,))
        return json.loads(rows[0][0]) if rows else None

    def batches(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first; `after`: a batch id, the page continues past it (KeyError when there is
        no such batch). (page, has_more)."""
        if after is not None:
            rows = self._query("SELECT seq FROM batches WHERE id = ?", (after,))
            if not rows:
                raise KeyError(after)
            start = rows[0][0]
            rows = self._query("SELECT doc FROM batches WHERE seq < ? ORDER BY seq DESC LIMIT ?", (start, limit + 1))
        else:
            rows = self._query("SELECT doc FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,))
        page = [json.loads(r[0]) for r in rows]
        return page[:limit], len(page) > limit

    def active_batches(self) -> list[dict]:
        return [b for b in (json.loads(r[0]) for r in self._query("SELECT doc FROM batches ORDER BY seq"))
                if b["status"] in ACTIVE]
