"""`trl-post-training dashboard --data-dir DIR`: the dashboard over a data dir, in its own small server."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse

from ..dashboard import dashboard_router, data_dir_source


def data_dir_app(data_dir: str | Path, token: str | None = None, url: str | None = None,
                 server_token: str | None = None) -> FastAPI:
    """The dashboard app for a data dir. With `token`, every data route needs `Authorization: Bearer
    TOKEN`, and cancel is offered when `url` names the server that runs the jobs (it is sent there)."""
    cancel = None
    if token and url:
        from .backends import connect

        def cancel_on_server(job_uuid: str) -> None:
            connect(url, server_token).cancel(job_uuid)

        cancel = cancel_on_server

    source = data_dir_source(data_dir, cancel=cancel)

    async def require_token(request: Request) -> None:
        if token and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    app = FastAPI(title="Post-training dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(dashboard_router(source, auth=[Depends(require_token)], actions=bool(token),
                                        token_required=bool(token)), prefix="/dashboard")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    return app


def serve_data_dir(data_dir: Path, host: str, port: int, token: str | None, url: str | None,
                   server_token: str | None) -> None:
    import uvicorn

    app = data_dir_app(data_dir, token, url, server_token)
    print(f"dashboard for {data_dir} on http://{host}:{port}/dashboard/ "
          f"({'cancel through ' + url if token and url else 'read-only'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
