"""Expiring leases on sample ranges, so many writers of one dataset never score a sample twice while its
lease holder lives, and take over the ranges of dead ones.

A lease is a small JSON object ``<dataset>/_leases/<range>/g<NNNNNN>.json`` (holder, generation,
``expires`` in Unix seconds). Generation files are only ever *created exclusively*
(`datastore.fs.create_exclusive`: local hard link, S3 ``If-None-Match: *``), so of any number of writers
trying to create the same generation exactly one succeeds:

- **claim** a free range: create ``g000001``;
- **take over** a range whose newest generation has expired (its holder stopped renewing: killed,
  crashed, or stalled longer than the lease), or whose holder is a process of this host that no longer
  exists: create the next generation;
- **renew** (a background thread, every third of the lease): the holder rewrites its own generation
  file with a later ``expires``; if a newer generation exists, the lease was taken over and is lost;
- **release** after the range is committed (or abandoned): the holder rewrites its file with
  ``expires = 0``, so the range is free at once.

Leases only prevent duplicate *work*. Duplicate *storage* is prevented by the commit itself: a range is
committed with a Delta application transaction (`datastore.table.DeltaDataset.commit`), which conflicts
with any other commit of the same range. A holder that stalled past its lease may score a range again,
but only one commit of it lands. Expiry compares writers' wall clocks: keep them within a small fraction
of the lease (NTP) — `LEASE_SECONDS` is a minute by default.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from datastore import fs

LEASES_DIR = "_leases"
LEASE_SECONDS = 60.0
_GEN_RE = re.compile(r"^g(\d{6})\.json$")


def holder_id() -> str:
    """A writer's identity in lease files and commits: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_local_holder(holder: str) -> bool:
    """True when `holder` is a process of this host that no longer runs: its lease need not be waited
    out (a killed local run is taken over at once; holders on other hosts expire with their lease)."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) runs no more either
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Lease:
    range_key: str
    generation: int
    holder: str
    expires: float
    lost: bool = False


class LeaseManager:
    """Claims, renews and releases leases of one dataset for one holder.

    Args:
        filesystem, root: the dataset directory (`datastore.fs.resolve`).
        holder: this writer's id (`holder_id`).
        lease_seconds: how long a lease lives without renewal; renewals run every third of it.
    """

    def __init__(self, filesystem, root: str, holder: str, lease_seconds: float = LEASE_SECONDS):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.fs, self.root, self.holder, self.lease_seconds = filesystem, root, holder, lease_seconds
        self.held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _dir(self, range_key: str) -> str:
        return fs.join(self.root, LEASES_DIR, range_key)

    def _path(self, range_key: str, generation: int) -> str:
        return fs.join(self._dir(range_key), f"g{generation:06d}.json")

    def _body(self, lease: Lease) -> bytes:
        return json.dumps({"range": lease.range_key, "generation": lease.generation, "holder": lease.holder,
                           "expires": lease.expires}).encode()

    def history(self, range_key: str) -> list[dict]:
        """Every generation of a range's lease, oldest first (what tests and `store show` inspect)."""
        out = []
        for name in fs.list_files(self.fs, self._dir(range_key)):
            if _GEN_RE.match(name):
                try:
                    out.append(json.loads(fs.read_bytes(self.fs, fs.join(self._dir(range_key), name))))
                except (OSError, ValueError):
                    out.append({"generation": int(_GEN_RE.match(name).group(1)), "holder": "?", "expires": 0})
        return sorted(out, key=lambda d: d.get("generation", 0))

    def _newest(self, range_key: str) -> tuple[int, dict | None]:
        gens = [int(m.group(1)) for n in fs.list_files(self.fs, self._dir(range_key)) if (m := _GEN_RE.match(n))]
        if not gens:
            return 0, None
        g = max(gens)
        try:
            return g, json.loads(fs.read_bytes(self.fs, self._path(range_key, g)))
        except (OSError, ValueError):  # being rewritten by its holder: treat as live
            return g, {"expires": time.time() + self.lease_seconds}

    def try_acquire(self, range_key: str) -> Lease | None:
        """Claim a free range or take over an expired one; None when a live holder has it (or another
        writer won the race for the same generation)."""
        g, newest = self._newest(range_key)
        if newest is not None and float(newest.get("expires", 0)) > time.time() and \
                not _dead_local_holder(str(newest.get("holder", ""))):
            return None
        lease = Lease(range_key, g + 1, self.holder, time.time() + self.lease_seconds)
        if not fs.create_exclusive(self.fs, self._path(range_key, lease.generation), self._body(lease)):
            return None
        with self._lock:
            self.held[range_key] = lease
        self._start()
        return lease

    def still_held(self, lease: Lease) -> bool:
        """False once a newer generation exists (the range was taken over) or the lease expired."""
        if lease.lost or time.time() >= lease.expires:
            return False
        g, _ = self._newest(lease.range_key)
        return g == lease.generation

    def release(self, lease: Lease) -> None:
        """Free the range now (expires = 0); a no-op when it was taken over meanwhile."""
        with self._lock:
            self.held.pop(lease.range_key, None)
        if self._newest(lease.range_key)[0] == lease.generation:
            lease.expires = 0.0
            fs.write_atomic(self.fs, self._path(lease.range_key, lease.generation), self._body(lease))

    def renew_all(self) -> None:
        """Push every held lease's expiry forward; mark the ones taken over as lost."""
        with self._lock:
            leases = list(self.held.values())
        for lease in leases:
            if self._newest(lease.range_key)[0] != lease.generation:
                lease.lost = True
                with self._lock:
                    self.held.pop(lease.range_key, None)
                continue
            lease.expires = time.time() + self.lease_seconds
            fs.write_atomic(self.fs, self._path(lease.range_key, lease.generation), self._body(lease))

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="logitfuse-lease-renewal", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew_all()
            except OSError:  # a transient store error: the next round retries before expiry
                pass

    def close(self) -> None:
        """Stop renewing and release whatever is still held."""
        self._stop.set()
        for lease in list(self.held.values()):
            try:
                self.release(lease)
            except OSError:
                pass
