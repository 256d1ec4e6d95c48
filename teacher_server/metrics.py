"""`GET /metrics`: Prometheus text exposition, computed from the job database on each scrape plus the
API process's own error counters (no client library needed for a handful of gauges)."""

from __future__ import annotations

import threading
from collections import Counter

from teacher_server.jobs import STATES, JobDB


class HttpErrors:
    """Responses with status >= 400, by status code (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[int] = Counter()

    def add(self, status: int) -> None:
        with self._lock:
            self._counts[status] += 1

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(db: JobDB, teachers: list[str], resident: list[str], http_errors: HttpErrors) -> str:
    counts = db.counts()
    totals = db.teacher_totals()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    metric("logitfuse_queue_depth", "gauge", "Jobs waiting in each teacher's queue.",
           [({"teacher": t}, counts.get((t, "queued"), 0)) for t in teachers])
    metric("logitfuse_jobs", "gauge", "Jobs by teacher and state.",
           [({"teacher": t, "state": s}, counts.get((t, s), 0)) for t in teachers for s in STATES])
    metric("logitfuse_tokens_per_second", "gauge", "Tokens scored per second by each teacher's running job.",
           [({"teacher": t}, round(float(totals.get(t, {}).get("tps") or 0), 3)) for t in teachers])
    metric("logitfuse_samples_done_total", "counter", "Samples stored by each teacher's jobs.",
           [({"teacher": t}, int(totals.get(t, {}).get("done") or 0)) for t in teachers])
    metric("logitfuse_tokens_total", "counter", "Tokens scored by each teacher's jobs.",
           [({"teacher": t}, int(totals.get(t, {}).get("tokens") or 0)) for t in teachers])
    metric("logitfuse_job_errors_total", "counter", "Jobs that failed, by teacher.",
           [({"teacher": t}, int(totals.get(t, {}).get("failed") or 0)) for t in teachers])
    metric("logitfuse_teacher_resident", "gauge", "1 when the teacher's worker process holds its model.",
           [({"teacher": t}, int(t in resident)) for t in teachers])
    metric("logitfuse_http_errors_total", "counter", "HTTP responses with an error status.",
           [({"status": str(s)}, n) for s, n in sorted(http_errors.snapshot().items())])
    return "\n".join(lines) + "\n"
