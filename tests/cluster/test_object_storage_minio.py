"""The trainer's object storage against real servers: the dev cluster's MinIO (built from its
Go module, started here on its own, without the control plane) and a local HTTPS server with
a private CA (trusted through SSL_CERT_FILE, as a trainer pod would be told).

Downloads land where the trainer reads them, with their sha256; a partial download resumes;
a complete one is reused without a request; pushes are multipart with sha256 checksums the
store verifies; bad credentials fail with the store's error code and never the secret.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from finetune_api import layout
from finetune_devcluster.cluster import S3_ACCESS_KEY, S3_REGION, _kill_group, free_port, minio_binary, minio_server
from finetune_trainer.config import ConfigError
from finetune_trainer.fetch import MANIFEST, fetch
from finetune_trainer.objectstore import Credentials, ObjectStoreError, S3Client
from tests.fixtures.cluster import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("minio")
    secret = secrets.token_hex(20)
    port = free_port()
    argv, env = minio_server(minio_binary(), root / "data", f"127.0.0.1:{port}",
                             f"127.0.0.1:{free_port()}", secret)
    log = open(root / "minio.log", "wb")
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    client = S3Client(endpoint, S3_REGION, Credentials(S3_ACCESS_KEY, secret))
    try:
        wait_for(lambda: proc.poll() is None and client.create_bucket("probe") is None,
                 timeout=60, what="MinIO to answer")
        yield {"client": client, "endpoint": endpoint, "secret": secret}
    finally:
        _kill_group(proc.pid)
        log.close()


def client_factory(store):
    return lambda: store["client"]


def test_an_s3_file_is_downloaded_with_its_sha256_and_reused_without_a_request(store, tmp_path):
    client = store["client"]
    client.create_bucket("data")
    body = b'{"instruction": "hi", "output": "arr"}\n' * 1000
    client.put_bytes("data", "sets/train.jsonl", body)

    entry = fetch("s3://data/sets/train.jsonl", tmp_path, s3=client_factory(store))

    path = tmp_path / layout.remote_source("s3://data/sets/train.jsonl")
    assert Path(entry["path"]) == path and path.read_bytes() == body
    assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["bytes"] == len(body)

    def no_requests():
        raise AssertionError("a complete download was fetched again")
    assert fetch("s3://data/sets/train.jsonl", tmp_path, s3=no_requests) == entry


def test_an_s3_prefix_is_downloaded_as_a_folder(store, tmp_path):
    client = store["client"]
    client.create_bucket("models")
    files = {"config.json": b"{}", "model.safetensors": os.urandom(300_000), "sub/tokenizer.json": b"[]"}
    for name, data in files.items():
        client.put_bytes("models", f"tiny/{name}", data)

    entry = fetch("s3://models/tiny/", tmp_path, s3=client_factory(store))

    folder = Path(entry["path"])
    assert folder.name == "tiny"
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    manifest = json.loads((folder.parent / MANIFEST).read_text())
    assert manifest["sha256"] == entry["sha256"] and len(manifest["files"]) == 3
    assert entry["bytes"] == sum(len(d) for d in files.values())


def test_a_partial_s3_download_resumes_to_the_right_bytes(store, tmp_path):
    client = store["client"]
    client.create_bucket("data")
    body = os.urandom(3 * 1024 * 1024 + 17)
    client.put_bytes("data", "big.jsonl", body)
    target = tmp_path / layout.remote_source("s3://data/big.jsonl")
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(body[:1_000_000])  # the pod was killed here

    entry = fetch("s3://data/big.jsonl", tmp_path, s3=client_factory(store))

    assert target.read_bytes() == body and entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert not target.with_name(target.name + ".part").exists()


def test_a_missing_object_is_a_config_error_naming_the_location(store, tmp_path):
    store["client"].create_bucket("data")
    with pytest.raises(ConfigError, match="s3://data/nothing-here.jsonl: no object"):
        fetch("s3://data/nothing-here.jsonl", tmp_path, s3=client_factory(store))


def test_bad_credentials_fail_with_the_stores_code_and_never_the_secret(store, tmp_path):
    wrong = "wrong-" + secrets.token_hex(8)
    bad = S3Client(store["endpoint"], S3_REGION, Credentials(S3_ACCESS_KEY, wrong))

    with pytest.raises(ConfigError) as err:
        fetch("s3://data/sets/train.jsonl", tmp_path, s3=lambda: bad)

    assert "HTTP 403" in str(err.value) and "s3://data/sets/train.jsonl" in str(err.value)
    assert wrong not in str(err.value) and store["secret"] not in str(err.value)


def test_multipart_upload_with_checksums_reads_back_identical(store, tmp_path):
    client = store["client"]
    client.create_bucket("out")
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "model.safetensors").write_bytes(data)

    client.upload("out", "run/adapter/model.safetensors", tmp_path / "model.safetensors",
                  part_size=5 * 1024 * 1024)  # three parts

    assert client.get_bytes("out", "run/adapter/model.safetensors") == data


def test_the_store_refuses_a_body_whose_checksum_does_not_match(store):
    client = store["client"]
    client.create_bucket("out")
    body = b"the real bytes"
    wrong = "bm90IHRoZSBzaGEyNTYgb2YgdGhlIGJvZHkgYXQgYWxsISE="  # base64 of 32 other bytes
    with pytest.raises(ObjectStoreError) as err:
        client._request("PUT", "out", "tampered", body=body, headers={"x-amz-checksum-sha256": wrong})
    assert err.value.status == 400
    assert client.head("out", "tampered") is None


# --- https:// ------------------------------------------------------------------------------

def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "1", "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.crt"))
    return d / "ca.crt", d / "server.crt", d / "server.key"


@pytest.fixture
def https_server(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    files: dict[str, bytes] = {}
    ranges: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            data = files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if rng := self.headers.get("Range"):
                ranges.append(rng)
                start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"https://127.0.0.1:{server.server_address[1]}", "files": files, "ca": ca, "ranges": ranges}
    server.shutdown()


def test_an_https_source_is_verified_against_ssl_cert_file_and_resumes(https_server, tmp_path, monkeypatch):
    body = os.urandom(200_000)
    https_server["files"]["/data/eval.jsonl"] = body
    url = f"{https_server['url']}/data/eval.jsonl"

    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(url, tmp_path)  # the private CA is not trusted by default

    monkeypatch.setenv("SSL_CERT_FILE", str(https_server["ca"]))
    target = tmp_path / layout.remote_source(url)
    target.with_name(target.name + ".part").write_bytes(body[:50_000])
    entry = fetch(url, tmp_path)

    assert https_server["ranges"] == ["bytes=50000-"]
    assert target.read_bytes() == body and entry["sha256"] == hashlib.sha256(body).hexdigest()
