"""A small HTTP client for the control plane and the inference worker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LogPage:
    """Part of a job's log: the text, the offset to read on from, the job's status."""

    text: str
    offset: int
    status: str


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

    def upload_dataset(
        self, path: Path, name: str | None = None, label_names: list[str] | None = None
    ) -> dict[str, Any]:
        """Upload a TSV; ``label_names`` names the class ids in order (sent as JSON)."""
        data: dict[str, str] = {}
        if name:
            data["name"] = name
        if label_names is not None:
            data["label_names"] = json.dumps(label_names, ensure_ascii=False)
        with Path(path).open("rb") as f:
            files = {"file": (Path(path).name, f, "text/tab-separated-values")}
            return dict(self._check(self.api.post("/datasets", files=files, data=data or None)))

    def _download(self, url: str, dest: Path) -> int:
        """Stream a GET into ``dest`` (written to a sibling, renamed when complete); bytes."""
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part")
        with self.api.stream("GET", url) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            total = 0
            with part.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    total += len(chunk)
        part.replace(dest)
        return total

    def download_model(self, model_id: int, dest: Path) -> int:
        """Save a model's ``.tar.gz`` (folder and model card) to ``dest``; returns its bytes."""
        return self._download(f"/models/{model_id}/download", dest)

    def predictions(self, job_id: int, dest: Path) -> int:
        """Save a predict job's TSV to ``dest``; returns its bytes."""
        return self._download(f"/jobs/{job_id}/predictions", dest)

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

    def report_html(self, job_id: int) -> str:
        """The pipeline's comparison report as a self-contained HTML page."""
        r = self.api.get(f"/jobs/{job_id}/report.html")
        if r.status_code >= 400:
            self._check(r)  # raises APIError with the server's detail
        return r.text

    def job_logs(self, job_id: int, *, tail: int | None = None, offset: int = 0) -> LogPage:
        """Whole lines of a job's log from byte ``offset`` on (the last ``tail`` of them)."""
        params: dict[str, int] = {"offset": offset}
        if tail is not None:
            params["tail"] = tail
        r = self.api.get(f"/jobs/{job_id}/logs", params=params)
        if r.status_code >= 400:
            self._check(r)
        return LogPage(
            text=r.content.decode("utf-8", "replace"),
            offset=int(r.headers.get("X-Log-Offset", offset)),
            status=r.headers.get("X-Job-Status", ""),
        )

    def delete_dataset(self, dataset_id: int) -> dict[str, Any]:
        return dict(self._check(self.api.delete(f"/datasets/{dataset_id}")))

    def delete_model(self, model_id: int, cascade: bool = False) -> dict[str, Any]:
        params = {"cascade": "true"} if cascade else None
        return dict(self._check(self.api.delete(f"/models/{model_id}", params=params)))

    def delete_job(self, job_id: int, cascade: bool = False) -> dict[str, Any]:
        params = {"cascade": "true"} if cascade else None
        return dict(self._check(self.api.delete(f"/jobs/{job_id}", params=params)))

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
