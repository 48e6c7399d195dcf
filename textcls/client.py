"""A small HTTP client for the control plane and the inference worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from textcls.settings import get_settings


class APIError(RuntimeError):
    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    """Turn FastAPI's ``detail`` (a string or a list of errors) into one line."""
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(x) for x in err.get("loc", []) if x != "body")
                parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def wait_ready(inference_url: str, model_id: int, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the inference worker at ``inference_url`` serves ``model_id``.

    Returns its ``/ready`` body; raises TimeoutError naming the last answer.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{inference_url}/ready", timeout=5)
            last = r.json()
            if r.status_code == 200 and last.get("model_id") == model_id:
                return dict(last)
        except (httpx.HTTPError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(
        f"{inference_url} did not serve model {model_id} within {timeout:.0f} s: {last}"
    )


class Client:
    def __init__(
        self,
        api_url: str | None = None,
        inference_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        settings = get_settings()
        headers = {}
        key = api_key or settings.api_key
        if key:
            headers["X-API-Key"] = key
        self.api = httpx.Client(
            base_url=api_url or settings.resolved_api_url(), timeout=timeout, headers=headers
        )
        pkey = settings.predict_api_key
        self.inference = httpx.Client(
            base_url=inference_url or settings.resolved_inference_url(),
            timeout=timeout,
            headers={"X-API-Key": pkey} if pkey else {},
        )

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise APIError(r.status_code, detail)
        return r.json()

    def upload_dataset(self, path: Path, name: str | None = None) -> dict[str, Any]:
        with Path(path).open("rb") as f:
            files = {"file": (Path(path).name, f, "text/tab-separated-values")}
            data = {"name": name} if name else None
            return dict(self._check(self.api.post("/datasets", files=files, data=data)))

    def datasets(self) -> list[dict[str, Any]]:
        return list(self._check(self.api.get("/datasets")))

    def submit(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        return dict(self._check(self.api.post("/jobs", json={"kind": kind, "params": params})))

    def jobs(self, **filters: Any) -> list[dict[str, Any]]:
        q = {k: v for k, v in filters.items() if v is not None}
        return list(self._check(self.api.get("/jobs", params=q)))

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self._check(self.api.get(f"/jobs/{job_id}")))

    def cancel(self, job_id: int) -> dict[str, Any]:
        return dict(self._check(self.api.post(f"/jobs/{job_id}/cancel")))

    def report(self, job_id: int) -> dict[str, Any]:
        return dict(self._check(self.api.get(f"/jobs/{job_id}/report")))

    def models(self, **filters: Any) -> list[dict[str, Any]]:
        q = {k: v for k, v in filters.items() if v is not None}
        return list(self._check(self.api.get("/models", params=q)))

    def model(self, model_id: int) -> dict[str, Any]:
        return dict(self._check(self.api.get(f"/models/{model_id}")))

    def lineage(self, model_id: int) -> list[dict[str, Any]]:
        return list(self._check(self.api.get(f"/models/{model_id}/lineage")))

    def promote(self, model_id: int, force: bool = False) -> dict[str, Any]:
        params = {"force": "true"} if force else None
        return dict(self._check(self.api.post(f"/models/{model_id}/promote", params=params)))

    def rollback(self) -> dict[str, Any]:
        return dict(self._check(self.api.post("/deployments/rollback")))

    def deployments(self) -> list[dict[str, Any]]:
        return list(self._check(self.api.get("/deployments")))

    def predict(self, text: str | list[str]) -> dict[str, Any]:
        return dict(self._check(self.inference.post("/predict", json={"text": text})))
