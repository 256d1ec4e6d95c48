"""The dashboard served by `logitfuse serve` at `/`: catalog, jobs, fusion reports, training runs.

Plain server-rendered HTML (Jinja2), styled by one vendored-free stylesheet and made live by one small
script of our own (`static/live.js`: polls the jobs table); charts are SVG drawn on the server
(`charts.py`). Every page works without JavaScript and has a JSON twin at the same path plus `.json`
(Datasette's convention), returning what `data.py` computed for the page.

Auth: the same team tokens as the API. A browser cannot send a bearer header when it follows a link, so
`/login` takes the token once and keeps it in an HttpOnly, SameSite=Strict session cookie (gone when the
browser closes). Pages need read scope; cancelling a job needs the owning team's write token.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from teacher_server.auth import Authenticator, AuthError, Principal
from teacher_server.dashboard import charts, data
from teacher_server.jobs import JobEnded

HERE = Path(__file__).parent
COOKIE = "logitfuse_token"
NAV = [("catalog", "Catalog", "/catalog"), ("jobs", "Jobs", "/jobs"), ("fusion", "Fusion", "/fusion"),
       ("runs", "Training", "/runs")]
SORTABLE = ("kind", "id", "teacher", "k", "samples", "bytes", "bytes_per_entry", "team", "created")


def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = _size
    env.globals["zip"] = zip
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * float(v):.1f}%"
    env.filters["num"] = lambda v: "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.3f}"
    env.filters["duration"] = _duration
    env.filters["when"] = lambda t: "–" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    return env


def _size(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


LOGIN_FORM_BYTES = 4096  # a token and a path: anything longer is not a login


async def _small_form(request: Request) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body of at most LOGIN_FORM_BYTES, read in chunks."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_FORM_BYTES:
            return {}
    pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8)
    return {k: v[0] for k, v in pairs.items()}


def mount_dashboard(app: FastAPI, service, auth: Authenticator) -> None:
    """Add the dashboard's routes (excluded from the OpenAPI schema) and its static files to `app`.

    `service` is the app's `JobService` (jobs, config: `store`, `runs`).
    """
    env = _templates()
    config = service.config
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    def principal(request: Request, scope: str = "read") -> Principal:
        header = request.headers.get("authorization")
        if not header and request.cookies.get(COOKIE):
            header = f"Bearer {request.cookies[COOKIE]}"
        return auth.require(header, scope)

    def page(request: Request, template: str, section: str, context: dict, status: int = 200) -> HTMLResponse:
        body = env.get_template(template).render(
            request=request, nav=NAV, section=section, auth_enabled=auth.enabled,
            team=context.pop("_team", None), **context)
        return HTMLResponse(body, status_code=status)

    def guarded(section: str, scope: str = "read"):
        """Decorator: HTML pages redirect to /login without a valid token; `.json` twins answer 401/403."""
        def wrap(fn):
            async def endpoint(request: Request):
                as_json = request.url.path.endswith(".json")
                try:
                    who = principal(request, scope)
                except AuthError as e:
                    if as_json or e.status == 403:
                        return JSONResponse({"error": e.message}, status_code=e.status)
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                try:
                    return await fn(request, who, as_json)
                except LookupError as e:
                    msg = str(e.args[0]) if e.args else "not found"
                    if as_json:
                        return JSONResponse({"error": msg}, status_code=404)
                    return page(request, "error.html", section, {"message": msg, "_team": who.team}, 404)
            endpoint.__name__ = fn.__name__
            return endpoint
        return wrap

    def route(path: str, endpoint, methods=("GET",)):
        app.add_api_route(path, endpoint, methods=list(methods), include_in_schema=False)

    # ------------------------------------------------------------------ login

    async def login_form(request: Request):
        return page(request, "login.html", "", {"next": request.query_params.get("next", "/"), "error": None})

    async def login(request: Request):
        form = await _small_form(request)
        token, next_path = form.get("token", ""), form.get("next", "/")
        target = next_path if next_path.startswith("/") and not next_path.startswith("//") else "/"
        try:
            who = auth.principal(f"Bearer {token.strip()}")
        except AuthError as e:
            return page(request, "login.html", "", {"next": target, "error": e.message}, 401)
        resp = RedirectResponse(target, status_code=303)
        # no max-age: a session cookie, kept until the browser closes
        resp.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", path="/")
        resp.headers["X-Logitfuse-Team"] = who.team
        return resp

    async def logout(request: Request):
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    route("/login", login_form)
    route("/login", login, methods=("POST",))
    route("/logout", logout, methods=("POST",))

    # ------------------------------------------------------------------ home

    @guarded("")
    async def home(request: Request, who: Principal, as_json: bool):
        rows = await run_in_threadpool(data.catalog, config.store)
        jobs = [j.public() for j in service.jobs(who, None, None, 1000)]
        summary = {
            "logits_datasets": sum(r["kind"] == "logits" for r in rows),
            "targets_datasets": sum(r["kind"] == "targets" for r in rows),
            "bytes": sum(r.get("bytes") or 0 for r in rows),
            "jobs": {s: sum(j["state"] == s for j in jobs) for s in ("queued", "running", "done", "failed", "cancelled")},
            "teachers": service.teachers(),
        }
        if as_json:
            return JSONResponse(summary)
        return page(request, "home.html", "", {"summary": summary, "_team": who.team})

    route("/", home)
    route("/index.json", home)

    # ------------------------------------------------------------------ catalog

    @guarded("catalog")
    async def catalog_page(request: Request, who: Principal, as_json: bool):
        q = request.query_params
        rows = await run_in_threadpool(data.catalog, config.store)
        kind, teacher, text = q.get("kind", ""), q.get("teacher", ""), q.get("q", "").strip().lower()
        teachers = sorted({r.get("teacher") or "" for r in rows if r["kind"] == "logits"} - {""})
        if kind:
            rows = [r for r in rows if r["kind"] == kind]
        if teacher:
            rows = [r for r in rows if r.get("teacher") == teacher]
        if text:
            rows = [r for r in rows if any(text in str(r.get(c) or "").lower()
                                           for c in ("id", "teacher", "dataset", "template", "team"))]
        sort = q.get("sort", "created") if q.get("sort") in SORTABLE else "created"
        desc = q.get("desc", "1" if sort == "created" else "0") == "1"
        present = [r for r in rows if r.get(sort) is not None]
        absent = [r for r in rows if r.get(sort) is None]
        present.sort(key=lambda r: r[sort], reverse=desc)
        rows = present + absent
        if as_json:
            return JSONResponse({"datasets": rows})

        def sort_link(col: str) -> str:
            params = {k: v for k, v in {"kind": kind, "teacher": teacher, "q": text}.items() if v}
            params.update(sort=col, desc="0" if (col == sort and desc) else "1")
            return "/catalog?" + urlencode(params)

        return page(request, "catalog.html", "catalog", {
            "rows": rows, "kind": kind, "teacher": teacher, "q": text, "teachers": teachers,
            "sort": sort, "desc": desc, "sort_link": sort_link, "columns": SORTABLE, "_team": who.team})

    route("/catalog", catalog_page)
    route("/catalog.json", catalog_page)

    @guarded("catalog")
    async def dataset_page(request: Request, who: Principal, as_json: bool):
        kind = request.path_params["kind"]
        ident = request.path_params["ident"].removesuffix(".json")
        if kind not in ("logits", "targets"):
            raise LookupError(f"unknown dataset kind {kind!r}: logits or targets")
        detail = await run_in_threadpool(data.dataset_detail, config.store, kind, ident)
        if as_json:
            return JSONResponse(detail)
        figures = {}
        hist = detail.get("histograms")
        if hist and hist["positions"]:
            figures["entropy"] = await run_in_threadpool(
                charts.histogram_chart, hist["entropy"]["edges"], hist["entropy"]["counts"],
                "Entropy per position", "entropy of the stored top-k, nats (lower bound)")
            figures["gold_rank"] = await run_in_threadpool(
                charts.bar_chart, hist["gold_rank"]["labels"], hist["gold_rank"]["counts"],
                "Rank of the gold token", "rank in the top-k", "positions")
        report = detail.get("fusion_report")
        if report:
            for t in report.get("targets", []):
                if t.get("targets_id") == ident or t.get("uri", "").rstrip("/").endswith(ident):
                    figures["winners"] = await run_in_threadpool(
                        charts.bar_chart, list(t["candidates"]), [t["winners"].get(c, 0) for c in t["candidates"]],
                        "MinCE winners", "candidate", "samples")
        return page(request, "dataset.html", "catalog", {"d": detail, "kind": kind, "figures": figures,
                                                          "_team": who.team})

    route("/catalog/{kind}/{ident}", dataset_page)

    # ------------------------------------------------------------------ jobs

    def job_rows(who: Principal) -> dict[str, list[dict]]:
        """The viewer's team's jobs (every team's for an admin token), as the API lists them."""
        now = time.time()
        groups: dict[str, list[dict]] = {"running": [], "queued": [], "finished": []}
        for j in service.jobs(who, None, None, 500):
            rec = j.public()
            rec["progress"] = rec["samples_done"] / rec["samples_total"] if rec["samples_total"] else 0.0
            rec["age_s"] = now - rec["created"]
            groups["finished" if rec["state"] in ("done", "failed", "cancelled") else rec["state"]].append(rec)
        return groups

    @guarded("jobs")
    async def jobs_page(request: Request, who: Principal, as_json: bool):
        groups = job_rows(who)
        if as_json:
            return JSONResponse(groups)
        template = "_jobs_tables.html" if request.query_params.get("partial") == "1" else "jobs.html"
        return page(request, template, "jobs", {"groups": groups, "me": who, "_team": who.team,
                                                  "message": request.query_params.get("message")})

    route("/jobs", jobs_page)
    route("/jobs.json", jobs_page)

    async def cancel(request: Request):
        job_id = request.path_params["job_id"]
        try:
            who = principal(request, "write")
        except AuthError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        try:
            service.cancel(job_id, who)  # AuthError(403) for another team's job
        except AuthError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except LookupError as e:
            return JSONResponse({"error": str(e.args[0]) if e.args else "not found"}, status_code=404)
        except JobEnded as e:  # it finished before the click: say so on the page, nothing changes
            return RedirectResponse("/jobs?" + urlencode({"message": str(e)}), status_code=303)
        return RedirectResponse("/jobs?" + urlencode({"message": f"job {job_id} cancelled"}), status_code=303)

    route("/jobs/{job_id}/cancel", cancel, methods=("POST",))

    # ------------------------------------------------------------------ fusion

    @guarded("fusion")
    async def fusion_page(request: Request, who: Principal, as_json: bool):
        reports = await run_in_threadpool(data.fusion_reports, config.store)
        if as_json:
            return JSONResponse({"reports": reports})
        return page(request, "fusion.html", "fusion", {"reports": reports, "_team": who.team})

    route("/fusion", fusion_page)
    route("/fusion.json", fusion_page)

    # ------------------------------------------------------------------ training runs

    def run_roots() -> list[str]:
        return list(getattr(config, "runs", None) or [])

    @guarded("runs")
    async def runs_page(request: Request, who: Principal, as_json: bool):
        runs = await run_in_threadpool(data.training_runs, run_roots())
        if as_json:
            return JSONResponse({"runs": runs, "directories": run_roots()})
        return page(request, "runs.html", "runs", {"runs": runs, "roots": run_roots(), "_team": who.team})

    route("/runs", runs_page)
    route("/runs.json", runs_page)

    @guarded("runs")
    async def run_page(request: Request, who: Principal, as_json: bool):
        name = request.path_params["name"].removesuffix(".json")
        run = await run_in_threadpool(data.training_run, run_roots(), name)
        if as_json:
            return JSONResponse(run)
        hist = run["history"]
        steps = [r["step"] for r in hist]
        series = {key: (steps, [r.get(key) for r in hist]) for key in ("loss", "sft", "fusion")
                  if all(isinstance(r.get(key), (int, float)) for r in hist) and hist}
        chart = await run_in_threadpool(charts.line_chart, series, f"Training run {name}", "optimizer step",
                                        "loss (nats per token)") if series else None
        return page(request, "run.html", "runs", {"run": run, "chart": chart, "_team": who.team})

    route("/runs/{name:path}", run_page)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)
