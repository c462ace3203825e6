"""The HTTP service: OpenAI's `/v1/files`, `/v1/fine_tuning/jobs`, `/v1/models` and a proxy of
`/v1/chat/completions` and `/v1/completions` to the InferenceService serving a fine-tuned model.

Handlers authenticate, call the pure mapping and the store, and make blocking Kubernetes
calls in threads. Every error leaves in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from kubernetes.client.rest import ApiException

from . import mapping
from .auth import NAMESPACE_HEADER, Authenticator, Principal
from .errors import ApiError, bad_request, conflict, not_found, too_many
from .files import FileStore, detect_format, public, validate
from .mapping import TERMINAL, job_id_of_model, openai_status, to_job
from .objectfiles import ObjectFileStore

log = logging.getLogger("finetune_openai")

ACTIVE_STATES = ("validating_files", "queued", "running")


@dataclass
class ApiConfig:
    files_dir: Optional[Path]
    files_claim: str = "openai-files"
    # Object storage instead of the claim: s3://bucket/prefix, the Secret each namespace holds
    # its credentials in, and (optionally) the endpoint the API itself uses.
    files_store: Optional[str] = None
    files_store_secret: str = "finetune-object-storage"
    files_store_endpoint: Optional[str] = None
    keys_namespace: str = "finetune-system"
    models: dict[str, str] = field(default_factory=dict)
    job_template: dict = field(default_factory=dict)
    max_stored_bytes: int = 10 << 30
    max_file_bytes: int = 512 << 20
    max_running_jobs: int = 4
    # Replaces the host of InferenceService URLs (local runs, where cluster DNS does not resolve).
    inference_host: Optional[str] = None


class Api:
    def __init__(self, cfg: ApiConfig, kube, authenticator: Optional[Authenticator] = None) -> None:
        self.cfg = cfg
        self.kube = kube
        self.auth = authenticator or Authenticator(kube, cfg.keys_namespace)
        if cfg.files_store:
            self.files = ObjectFileStore(cfg.files_store, cfg.files_store_secret, kube, endpoint=cfg.files_store_endpoint,
                                         scratch=cfg.files_dir, max_stored_bytes=cfg.max_stored_bytes,
                                         max_file_bytes=cfg.max_file_bytes)
        else:
            self.files = FileStore(cfg.files_dir, cfg.files_claim, max_stored_bytes=cfg.max_stored_bytes,
                                   max_file_bytes=cfg.max_file_bytes)
        self.http: Optional[ClientSession] = None

    # plumbing ----------------------------------------------------------------------------------
    async def call(self, fn, *args, **kw):
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except ApiException as e:
            raise _kube_error(e) from None

    async def principal(self, request: web.Request, verb: str) -> Principal:
        p = await asyncio.to_thread(self.auth.authenticate, request.headers.get("Authorization"),
                                    request.headers.get(NAMESPACE_HEADER))
        await asyncio.to_thread(self.auth.authorize, p, verb)
        return p

    async def job(self, namespace: str, job_id: str) -> dict:
        mapping.require_job_id(job_id)
        obj = await self.call(self.kube.get_job, namespace, job_id)
        if obj is None or ((obj.get("metadata") or {}).get("labels") or {}).get(mapping.API_LABEL) != "true":
            raise ApiError(404, f"No such fine-tuning job: '{job_id}'", code="fine_tuning_job_not_found",
                           param="fine_tuning_job_id")
        return obj

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=self.cfg.max_file_bytes + (1 << 20))
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_post("/v1/files", self.upload)
        r.add_get("/v1/files", self.list_files)
        r.add_get("/v1/files/{file_id}", self.get_file)
        r.add_get("/v1/files/{file_id}/content", self.file_content)
        r.add_delete("/v1/files/{file_id}", self.delete_file)
        r.add_post("/v1/fine_tuning/jobs", self.create_job)
        r.add_get("/v1/fine_tuning/jobs", self.list_jobs)
        r.add_get("/v1/fine_tuning/jobs/{job_id}", self.get_job)
        r.add_post("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel)
        r.add_post("/v1/fine_tuning/jobs/{job_id}/pause", self.pause)
        r.add_post("/v1/fine_tuning/jobs/{job_id}/resume", self.resume)
        r.add_get("/v1/fine_tuning/jobs/{job_id}/events", self.events)
        r.add_get("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.checkpoints)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model}", self.get_model)
        r.add_post("/v1/chat/completions", self.proxy)
        r.add_post("/v1/completions", self.proxy)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=600, sock_connect=10))

    async def _stop(self, _app) -> None:
        if self.http:
            await self.http.close()

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # files -----------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "create")
        if not request.content_type.startswith("multipart/"):
            raise bad_request("upload the file as multipart/form-data with the fields 'file' and 'purpose'")
        upload, purpose, filename = None, None, None
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    if upload is not None:
                        raise bad_request("send one 'file' field", param="file")
                    filename = part.filename or "upload.jsonl"
                    upload = await asyncio.to_thread(self.files.new_upload, p.namespace)
                    while chunk := await part.read_chunk(1 << 20):
                        upload.write(chunk)
                    upload.close()
                else:
                    await part.release()
            if purpose is None:
                raise bad_request("Missing required parameter: 'purpose'", param="purpose",
                                  code="missing_required_parameter")
            if purpose != "fine-tune":
                raise bad_request(f"purpose {purpose!r} is not supported here: only 'fine-tune'", param="purpose")
            if upload is None:
                raise bad_request("Missing required parameter: 'file'", param="file", code="missing_required_parameter")
            if not filename.endswith(".jsonl"):
                raise bad_request(f"Invalid file format for Fine-Tuning API. Must be .jsonl, got {filename!r}",
                                  param="file", code="invalid_file_format")
            fmt = await asyncio.to_thread(detect_format, upload.path)
            await asyncio.to_thread(validate, upload.path, fmt)
            record = await asyncio.to_thread(self.files.commit, p.namespace, upload, file_id=mapping.new_file_id(),
                                             filename=filename, purpose=purpose, fmt=fmt)
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        log.info("namespace %s: stored %s (%s, %d bytes, %s records)", p.namespace, record["id"],
                 filename, record["bytes"], fmt)
        return web.json_response(record)

    async def list_files(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "list")
        records = [public(r) for r in await asyncio.to_thread(self.files.list, p.namespace)]
        purpose = request.query.get("purpose")
        if purpose:
            records = [r for r in records if r["purpose"] == purpose]
        limit = mapping.parse_limit(request.query.get("limit"), default=10000, maximum=10000)
        return web.json_response(mapping.page(records, after=request.query.get("after"), limit=limit))

    async def _result_file(self, namespace: str, file_id: str) -> Optional[tuple[dict, str]]:
        """(file object, job id) when file_id is the result file of a job in the namespace."""
        for obj in await self.call(self.kube.list_jobs, namespace):
            job_id = obj["metadata"]["name"]
            if mapping.result_file_id(job_id) == file_id:
                record = await asyncio.to_thread(self.files.result_record, namespace, job_id)
                return (record, job_id) if record else None
        return None

    async def get_file(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "get")
        file_id = request.match_info["file_id"]
        try:
            return web.json_response(public(await asyncio.to_thread(self.files.get, p.namespace, file_id)))
        except ApiError as e:
            result = await self._result_file(p.namespace, file_id) if e.status == 404 else None
            if result is None:
                raise
            return web.json_response(result[0])

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        p = await self.principal(request, "get")
        file_id = request.match_info["file_id"]
        try:
            source = await asyncio.to_thread(self.files.open_content, p.namespace, file_id)
            content_type = "application/jsonl"
        except ApiError as e:
            result = await self._result_file(p.namespace, file_id) if e.status == 404 else None
            if result is None:
                raise
            source = await asyncio.to_thread(self.files.open_results, p.namespace, result[1])
            content_type = "text/csv"
        return await _stream(request, source, content_type)

    async def delete_file(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "delete")
        file_id = request.match_info["file_id"]
        await asyncio.to_thread(self.files.get, p.namespace, file_id)
        for obj in await self.call(self.kube.list_jobs, p.namespace):
            ann = (obj.get("metadata") or {}).get("annotations") or {}
            if file_id in (ann.get(mapping.A_TRAINING_FILE), ann.get(mapping.A_VALIDATION_FILE)) and \
                    openai_status(obj) not in TERMINAL:
                raise conflict(f"file {file_id} is used by fine-tuning job {obj['metadata']['name']}, which has "
                               "not finished; cancel it or wait")
        await asyncio.to_thread(self.files.delete, p.namespace, file_id)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # jobs ------------------------------------------------------------------------------------
    async def create_job(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "create")
        req = mapping.parse_create(await _json(request))
        source = self.cfg.models.get(req.model)
        if source is None:
            raise ApiError(400, f"Model {req.model!r} is not available for fine-tuning here; available: "
                           f"{', '.join(sorted(self.cfg.models)) or 'none'}", param="model", code="model_not_available")
        training = await asyncio.to_thread(self.files.data_file, p.namespace, req.training_file, "training_file")
        validation = None
        if req.validation_file:
            validation = await asyncio.to_thread(self.files.data_file, p.namespace, req.validation_file,
                                                 "validation_file")
            if validation.format != training.format:
                raise bad_request(f"validation_file holds {validation.format} records but training_file "
                                  f"holds {training.format} records", param="validation_file")
        if (training.format == "preference") != (req.method == "dpo"):
            raise bad_request("preference data (input/preferred_output/non_preferred_output) trains only with "
                              "method.type dpo, and dpo only on preference data", param="training_file")
        active = [j for j in await self.call(self.kube.list_jobs, p.namespace) if openai_status(j) in ACTIVE_STATES]
        idempotent_retry = request.headers.get("Idempotency-Key") and any(
            j["metadata"]["name"] == mapping.job_id_for_key(p.namespace, request.headers["Idempotency-Key"]) for j in active)
        if len(active) >= self.cfg.max_running_jobs and not idempotent_retry:
            raise too_many(f"namespace {p.namespace} already has {len(active)} fine-tuning jobs queued or "
                           f"running, its limit; wait for one to finish or cancel one", "rate_limit_exceeded")
        # With an Idempotency-Key the id is derived from it, so a retried create finds its job.
        idempotency_key = request.headers.get("Idempotency-Key")
        job_id = mapping.job_id_for_key(p.namespace, idempotency_key) if idempotency_key else mapping.new_job_id()
        body = mapping.build_finetunejob(req, job_id=job_id, namespace=p.namespace, model_source=source,
                                         template=self.cfg.job_template, training=training, validation=validation,
                                         results_file=self.files.results_location(p.namespace, job_id),
                                         object_storage_secret=self.files.secret_name)
        try:
            created = await asyncio.to_thread(self.kube.create_job, p.namespace, body)
        except ApiException as e:
            if e.status != 409 or not idempotency_key:
                raise _kube_error(e) from None
            return web.json_response(to_job(await self.job(p.namespace, job_id)))
        log.info("namespace %s: created fine-tuning job %s (model %s, %s)", p.namespace, job_id, req.model,
                 req.training_file)
        return web.json_response(to_job(created))

    async def list_jobs(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "list")
        wanted = {k[len("metadata["):-1]: v for k, v in request.query.items()
                  if k.startswith("metadata[") and k.endswith("]")}
        objs = [o for o in await self.call(self.kube.list_jobs, p.namespace) if mapping.matches_metadata(o, wanted)]
        jobs = sorted((to_job(o) for o in objs), key=lambda j: (j["created_at"], j["id"]), reverse=True)
        return web.json_response(mapping.page(jobs, after=request.query.get("after"),
                                              limit=mapping.parse_limit(request.query.get("limit"))))

    async def get_job(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "get")
        return web.json_response(to_job(await self.job(p.namespace, request.match_info["job_id"])))

    async def _transition(self, request: web.Request, *, allowed: tuple[str, ...], patch: dict, verb: str) -> web.Response:
        p = await self.principal(request, "patch")
        job_id = request.match_info["job_id"]
        obj = await self.job(p.namespace, job_id)
        state = openai_status(obj)
        if state not in allowed:
            raise conflict(f"fine-tuning job {job_id} is {state}; it cannot be {verb}")
        updated = await self.call(self.kube.patch_job, p.namespace, job_id, patch)
        log.info("namespace %s: fine-tuning job %s %s", p.namespace, job_id, verb)
        return web.json_response(to_job(updated))

    async def cancel(self, request: web.Request) -> web.Response:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return await self._transition(request, allowed=ACTIVE_STATES + ("paused",), verb="cancelled",
                                      patch={"metadata": {"annotations": {mapping.A_CANCELLED: now}},
                                             "spec": {"suspend": True}})

    async def pause(self, request: web.Request) -> web.Response:
        return await self._transition(request, allowed=ACTIVE_STATES, verb="paused", patch={"spec": {"suspend": True}})

    async def resume(self, request: web.Request) -> web.Response:
        return await self._transition(request, allowed=("paused",), verb="resumed", patch={"spec": {"suspend": False}})

    async def events(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "get")
        obj = await self.job(p.namespace, request.match_info["job_id"])
        kube_events = await self.call(self.kube.job_events, p.namespace, obj["metadata"]["name"])
        return web.json_response(mapping.page(mapping.to_events(obj, kube_events), after=request.query.get("after"),
                                              limit=mapping.parse_limit(request.query.get("limit"))))

    async def checkpoints(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "get")
        obj = await self.job(p.namespace, request.match_info["job_id"])
        page = mapping.page(mapping.to_checkpoints(obj), after=request.query.get("after"),
                            limit=mapping.parse_limit(request.query.get("limit"), default=10))
        page["first_id"] = page["data"][0]["id"] if page["data"] else None
        page["last_id"] = page["data"][-1]["id"] if page["data"] else None
        return web.json_response(page)

    # models and inference --------------------------------------------------------------------
    async def _fine_tuned(self, namespace: str) -> list[dict]:
        return [j for j in (to_job(o) for o in await self.call(self.kube.list_jobs, namespace))
                if j["fine_tuned_model"]]

    async def list_models(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "list")
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "finetune-operator"}
                  for name in sorted(self.cfg.models)]
        models += [{"id": j["fine_tuned_model"], "object": "model", "created": j["finished_at"] or j["created_at"],
                    "owned_by": p.namespace} for j in await self._fine_tuned(p.namespace)]
        return web.json_response({"object": "list", "data": models})

    async def get_model(self, request: web.Request) -> web.Response:
        p = await self.principal(request, "get")
        name = request.match_info["model"]
        if name in self.cfg.models:
            return web.json_response({"id": name, "object": "model", "created": 0, "owned_by": "finetune-operator"})
        for j in await self._fine_tuned(p.namespace):
            if j["fine_tuned_model"] == name:
                return web.json_response({"id": name, "object": "model", "created": j["finished_at"] or j["created_at"],
                                          "owned_by": p.namespace})
        raise _model_not_found(name)

    async def _served_url(self, namespace: str, model: str) -> tuple[str, str]:
        """(base URL of the InferenceService, adapter name it serves) for a fine-tuned model."""
        job_id = job_id_of_model(model)
        if job_id is None:
            raise _model_not_found(model)
        obj = await self.call(self.kube.get_job, namespace, job_id)
        if obj is None or to_job(obj)["fine_tuned_model"] != model:
            raise _model_not_found(model)
        isvc_name = ((obj.get("status") or {}).get("inferenceService") or {}).get("name")
        isvc = await self.call(self.kube.get_inference_service, namespace, isvc_name) if isvc_name else None
        st = (isvc or {}).get("status") or {}
        if not st.get("url") or job_id not in (st.get("servedModels") or []):
            raise ApiError(503, f"The model {model!r} is not being served right now (InferenceService "
                           f"{isvc_name or '?'} is {st.get('phase', 'missing')})", code="model_not_ready")
        url = st["url"]
        if self.cfg.inference_host:
            parts = urllib.parse.urlsplit(url)
            url = parts._replace(netloc=f"{self.cfg.inference_host}:{parts.port or 80}").geturl()
        return url.rstrip("/"), job_id

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        p = await self.principal(request, "get")
        body = await _json(request)
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            raise bad_request("Missing required parameter: 'model'", param="model", code="missing_required_parameter")
        base, served = await self._served_url(p.namespace, model)
        target = base + request.path.removeprefix("/v1")
        upstream_body = json.dumps({**body, "model": served}).encode()
        try:
            upstream = await self.http.post(target, data=upstream_body, headers={"Content-Type": "application/json"})
        except (OSError, ClientError) as e:
            raise ApiError(502, f"the InferenceService serving {model!r} did not answer: {e.__class__.__name__}",
                           code="upstream_unavailable") from None
        async with upstream:
            renamed = (f'"model":"{served}"'.encode(), f'"model":{json.dumps(model)}'.encode())
            spaced = (f'"model": "{served}"'.encode(), f'"model": {json.dumps(model)}'.encode())
            if body.get("stream"):
                out = web.StreamResponse(status=upstream.status, headers={
                    "Content-Type": upstream.headers.get("Content-Type", "text/event-stream")})
                await out.prepare(request)
                async for line in upstream.content:
                    await out.write(line.replace(*renamed).replace(*spaced))
                await out.write_eof()
                return out
            raw = await upstream.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                raise ApiError(502, f"the InferenceService answered {upstream.status} with a body that is not JSON",
                               code="upstream_error") from None
            if isinstance(payload, dict) and payload.get("model") == served:
                payload["model"] = model
            return web.json_response(payload, status=upstream.status)


def _model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def _kube_error(e: ApiException) -> ApiError:
    message = e.reason or "error"
    try:
        message = json.loads(e.body).get("message", message)
    except (TypeError, ValueError, AttributeError):
        pass
    if e.status == 422:
        return bad_request(f"the FineTuneJob was refused: {message}")
    if e.status == 409:
        return conflict(message)
    if e.status == 404:
        return ApiError(404, message, code="not_found")
    log.warning("Kubernetes API error %s: %s", e.status, message)
    return ApiError(502, f"the Kubernetes API answered {e.status}: {message}", code="kubernetes_error")


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "file_too_large"}.get(e.status, "http_error")
        return web.json_response(ApiError(e.status, f"{request.method} {request.path}: {e.reason}",
                                          code=code).body(), status=e.status)
    except Exception:  # noqa: BLE001 - answer in OpenAI's shape; the log has the traceback
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(ApiError(500, "internal error; the service's log has details",
                                          code="internal_error").body(), status=500)


async def _stream(request: web.Request, source, content_type: str) -> web.StreamResponse:
    """Send a file-like source (a file on the claim, or an object store's response) in chunks."""
    try:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        while chunk := await asyncio.to_thread(source.read, 1 << 20):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        source.close()
