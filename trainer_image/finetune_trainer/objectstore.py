"""A small S3 client (Signature V4, path-style) for any S3-compatible store: AWS S3, MinIO,
Ceph RGW, R2. Only what the trainer needs: list, head, ranged get, put, multipart upload with
sha256 checksums, create bucket.

Credentials come from the AWS SDKs' standard environment variables (the trainer Job fills them
from spec.objectStorage.secretRef): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_REGION (default us-east-1) and AWS_ENDPOINT_URL (default AWS's regional endpoint). Without
a key pair requests go unsigned (public buckets). Error messages name the operation, the
s3:// location and the store's error code, never a credential.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Parts of a multipart upload (S3's minimum is 5 MiB, except for the last part).
PART_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024
TIMEOUT = 60
HINTS = {403: "access denied: check the credentials in spec.objectStorage.secretRef and the bucket's policy",
         404: "not found"}


class ObjectStoreError(RuntimeError):
    """A request failed; `status` is the HTTP status (0 when the store was not reached)."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Credentials:
    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""

    @classmethod
    def from_env(cls, env=os.environ) -> "Credentials":
        return cls(env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", ""),
                   env.get("AWS_SESSION_TOKEN", ""))

    def __repr__(self) -> str:  # never printed by accident
        return f"Credentials(access_key={'set' if self.access_key else 'unset'})"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _q(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def sign_v4(method: str, host: str, path: str, query: dict[str, str], headers: dict[str, str],
            payload_sha256: str, creds: Credentials, region: str,
            now: _dt.datetime | None = None) -> dict[str, str]:
    """The headers of a request signed with AWS Signature Version 4 (service s3). `path` is
    already URI-encoded."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    out = {k.lower(): str(v).strip() for k, v in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    if creds.session_token:
        out["x-amz-security-token"] = creds.session_token
    if not (creds.access_key and creds.secret_key):
        return out
    signed = sorted(out)
    canonical_query = "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join([method, path, canonical_query,
                           "".join(f"{k}:{out[k]}\n" for k in signed), ";".join(signed),
                           payload_sha256])
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(f"AWS4{creds.secret_key}".encode(), amz_date[:8])
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={';'.join(signed)}, Signature={signature}")
    return out


def _strip_ns(root: ElementTree.Element) -> None:
    for el in root.iter():
        if "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]


class S3Client:
    def __init__(self, endpoint: str | None = None, region: str | None = None,
                 creds: Credentials | None = None, ssl_context: ssl.SSLContext | None = None):
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        self.endpoint = (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL")
                         or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
        self.creds = creds or Credentials.from_env()
        self.ssl_context = ssl_context

    @classmethod
    def from_env(cls) -> "S3Client":
        return cls()

    # requests ------------------------------------------------------------------------------
    def _request(self, method: str, bucket: str, key: str = "", *, query: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None, body: bytes = b"",
                 payload_sha256: str | None = None, stream: bool = False):
        query = query or {}
        base = urllib.parse.urlsplit(self.endpoint)
        path = (base.path.rstrip("/") + "/" + _q(bucket, "-_.~") + ("/" + _q(key, "-_.~/") if key else ""))
        signed = sign_v4(method, base.netloc, path, query, headers or {},
                         payload_sha256 or hashlib.sha256(body).hexdigest(), self.creds, self.region)
        url = f"{base.scheme}://{base.netloc}{path}"
        if query:
            url += "?" + "&".join(f"{_q(k)}={_q(v)}" for k, v in sorted(query.items()))
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None,
                                     method=method, headers=signed)
        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT, context=self.ssl_context)
        except urllib.error.HTTPError as exc:
            code, message = "", ""
            try:
                root = ElementTree.fromstring(exc.read() or b"<Error/>")
                _strip_ns(root)
                code, message = root.findtext("Code") or "", root.findtext("Message") or ""
            except ElementTree.ParseError:
                pass
            # HEAD answers carry no body: some stores name the error in a header.
            code = code or exc.headers.get("x-minio-error-code", "") or exc.headers.get("x-amz-error-code", "")
            message = message or exc.headers.get("x-minio-error-desc", "").strip('"') or HINTS.get(exc.code, "")
            raise ObjectStoreError(f"{method} {where}: HTTP {exc.code} {code}: {message}".rstrip(": "),
                                   exc.code, code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ObjectStoreError(f"{method} {where}: cannot reach {self.endpoint}: {reason}") from None
        if stream:
            return resp
        with resp:
            return resp.status, dict(resp.headers), resp.read()

    # operations ----------------------------------------------------------------------------
    def create_bucket(self, bucket: str) -> None:
        try:
            self._request("PUT", bucket)
        except ObjectStoreError as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            _, headers, _ = self._request("HEAD", bucket, key)
        except ObjectStoreError as exc:
            if exc.status == 404:
                return None
            raise
        return ObjectInfo(key, int(headers.get("Content-Length", 0)), headers.get("ETag", "").strip('"'))

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            _, _, body = self._request("GET", bucket, query=query)
            root = ElementTree.fromstring(body)
            _strip_ns(root)
            for item in root.findall("Contents"):
                yield ObjectInfo(item.findtext("Key") or "", int(item.findtext("Size") or 0),
                                 (item.findtext("ETag") or "").strip('"'))
            if root.findtext("IsTruncated") != "true":
                return
            token = root.findtext("NextContinuationToken")

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self._request("GET", bucket, key)[2]

    def download(self, bucket: str, key: str, dest: Path, size: int) -> None:
        """GET into `dest`, resuming from what a `.part` file beside it already holds."""
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            resp = self._request("GET", bucket, key, headers=headers, payload_sha256=EMPTY_SHA256,
                                 stream=True)
            with resp, part.open("ab" if have and resp.status == 206 else "wb") as out:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
        elif not part.exists():
            part.touch()
        if part.stat().st_size != size:
            raise ObjectStoreError(f"GET s3://{bucket}/{key}: got {part.stat().st_size} of {size} bytes")
        part.replace(dest)

    def open(self, bucket: str, key: str):
        """A streaming GET: a file-like response to read() in chunks and close."""
        return self._request("GET", bucket, key, payload_sha256=EMPTY_SHA256, stream=True)

    def delete(self, bucket: str, key: str) -> None:
        """DELETE an object (S3 answers 204 whether or not it existed)."""
        self._request("DELETE", bucket, key)

    def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data)
        self._request("PUT", bucket, key, body=data, payload_sha256=digest.hexdigest(),
                      headers={"x-amz-checksum-sha256": base64.b64encode(digest.digest()).decode()})

    def upload(self, bucket: str, key: str, path: Path, part_size: int = PART_SIZE) -> None:
        """One PUT for small files, a multipart upload (sha256 checksum per part) otherwise."""
        size = path.stat().st_size
        if size <= part_size:
            self.put_bytes(bucket, key, path.read_bytes())
            return
        _, _, body = self._request("POST", bucket, key, query={"uploads": ""},
                                   headers={"x-amz-checksum-algorithm": "SHA256"})
        root = ElementTree.fromstring(body)
        _strip_ns(root)
        upload_id = root.findtext("UploadId") or ""
        parts: list[tuple[int, str, str]] = []
        try:
            with path.open("rb") as f:
                number = 1
                while data := f.read(part_size):
                    digest = hashlib.sha256(data)
                    checksum = base64.b64encode(digest.digest()).decode()
                    _, headers, _ = self._request(
                        "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                        body=data, payload_sha256=digest.hexdigest(),
                        headers={"x-amz-checksum-sha256": checksum})
                    parts.append((number, headers.get("ETag", ""), checksum))
                    number += 1
            xml = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag>"
                          f"<ChecksumSHA256>{c}</ChecksumSHA256></Part>" for n, etag, c in parts)
            self._request("POST", bucket, key, query={"uploadId": upload_id},
                          body=f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode())
        except BaseException:
            try:
                self._request("DELETE", bucket, key, query={"uploadId": upload_id})
            except ObjectStoreError:
                pass
            raise

