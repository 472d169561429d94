"""s3:// reads against a real S3-compatible server on 127.0.0.1 (moto), behind a proxy
that injects server errors: retried with backoff, cached, or counted and skipped."""

import http.client
import http.server
import io
import json
import logging
import os
import socket
import threading

import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell_jax import config as config_lib
from dinocell_jax.data import pipeline
from dinocell_jax.data.sources import CORRECTION_DTYPE, FileReader, ReadError

pytest.importorskip("moto.server")
from moto.server import ThreadedMotoServer  # noqa: E402

SIZE = 16
BUCKET = "cellpainting-gallery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the S3 server; answers 503 to the next `failures[path]`
    GETs of a path (-1: always) and counts the requests that reach each path."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.failures: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        self.requests: dict[str, int] = {}  # any method
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        server: FaultProxy = self.server
        path = self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.requests[path] = server.requests.get(path, 0) + 1
        if self.command == "GET":
            with server.lock:
                server.gets[path] = server.gets.get(path, 0) + 1
                left = server.failures.get(path, 0)
                if left:
                    server.failures[path] = left - 1 if left > 0 else left
            if left:
                error = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
        conn = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture(scope="module")
def s3():
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=BUCKET)
    # Public like the Cell Painting Gallery: anonymous reads and listings.
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
    try:
        yield client, proxy, f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        server.stop()


def upload_fields(client, n_fields=3):
    """JUMP-like layout in the bucket; returns (table URL, {well: expected field}, {well: {stain: key}})."""
    rng = np.random.default_rng(0)
    prefix = "cpg0000-jump-pilot/source_4"
    image_dir = f"s3://{BUCKET}/{prefix}/images/2020_11_04_CPJUMP1/images/BR00116991__2020-11-05T19_51_35-Measurement1/Images/"
    illum_dir = f"s3://{BUCKET}/{prefix}/images/2020_11_04_CPJUMP1/illum/BR00116991/"
    expected, keys, rows = {}, {}, []
    illum = {}
    for stain in config_lib.CHANNELS:
        illum[stain] = rng.uniform(1.0, 2.0, (SIZE, SIZE))
        buf = io.BytesIO()
        np.save(buf, illum[stain])
        client.put_object(Bucket=BUCKET, ACL="public-read", Key=f"{illum_dir[len(f's3://{BUCKET}/'):]}BR00116991_Illum{stain}.npy", Body=buf.getvalue())
    for w in range(n_fields):
        well = f"A{w + 1:02d}"
        row = {"Metadata_Source": "source_4", "Metadata_Batch": "2020_11_04_CPJUMP1", "Metadata_Plate": "BR00116991",
               "Metadata_Well": well, "Metadata_Site": "1"}
        planes, keys[well] = [], {}
        for stain in config_lib.CHANNELS:
            arr = rng.integers(0, 65535, (SIZE, SIZE), dtype=np.uint16)
            name = f"r01c{w + 1:02d}f01p01-ch{config_lib.CHANNELS.index(stain) + 1}sk1fk1fl1.tiff"
            buf = io.BytesIO()
            tifffile.imwrite(buf, arr)
            key = f"{image_dir[len(f's3://{BUCKET}/'):]}{name}"
            client.put_object(Bucket=BUCKET, ACL="public-read", Key=key, Body=buf.getvalue())
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, image_dir
            row[f"FileName_Illum{stain}"] = f"BR00116991_Illum{stain}.npy"
            row[f"PathName_Illum{stain}"] = illum_dir
            planes.append(np.rint(np.divide(arr, illum[stain], dtype=CORRECTION_DTYPE)).astype(np.uint16))
            keys[well][stain] = key
        expected[well] = np.stack(planes)
        rows.append(row)
    table_key = f"{prefix}/workspace/load_data_csv/2020_11_04_CPJUMP1/BR00116991/load_data_with_illum.csv"
    client.put_object(Bucket=BUCKET, ACL="public-read", Key=table_key, Body=pd.DataFrame(rows).to_csv(index=False).encode())
    return f"s3://{BUCKET}/{table_key}", expected, keys


def s3_config(table, endpoint, cache_dir, **data):
    c = config_lib.base_config()
    c.train.batch_size = 1
    c.data.update(dict(source=f"loaddata:{table}", s3_endpoint_url=endpoint, field_size=SIZE, holdout=0.0,
                       normalization="minmax", num_workers=0, read_threads=1, prefetch=1, read_retries=3,
                       retry_backoff_s=0.01, cache_dir=str(cache_dir), cache_max_gb=0.01))
    c.data.update(data)
    return c


def test_s3_loaddata_with_illumination_retries_injected_errors_and_caches(s3, tmp_path, caplog):
    client, proxy, endpoint = s3
    table, expected, keys = upload_fields(client)
    flaky = f"/{BUCKET}/{keys['A01']['DNA']}"
    proxy.failures[flaky] = 2  # two 503s, then the object

    src = pipeline.make_source(s3_config(table, endpoint, tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="dinocell_jax.data.sources"):
        records = {src[i]["well"]: src[i] for i in range(len(src))}
    assert set(records) == set(expected)
    for well, r in records.items():
        np.testing.assert_array_equal(r["field"], expected[well])
    assert proxy.gets[flaky] == 3 and src.reader.retried == 2
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and all(f"s3://{BUCKET}/{keys['A01']['DNA']}" in m for m in retries)

    # A second pass is served by the local cache: no request reaches the server.
    before = dict(proxy.gets)
    fresh = pipeline.make_source(s3_config(table, endpoint, tmp_path / "cache"))
    np.testing.assert_array_equal(fresh[0]["field"], records[fresh[0]["well"]]["field"])
    assert proxy.gets == before


def test_s3_error_after_retries_is_counted_and_skipped(s3, tmp_path, caplog):
    client, proxy, endpoint = s3
    table, expected, keys = upload_fields(client)
    dead = f"/{BUCKET}/{keys['A02']['ER']}"
    proxy.failures[dead] = -1
    gets_before = proxy.gets.get(dead, 0)
    c = s3_config(table, endpoint, tmp_path / "cache", max_failure_fraction=0.5)
    it = pipeline.make_iterator(c, seed=0, process_index=0, process_count=1, num_epochs=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="dinocell_jax.data.pipeline"):
        wells = [b["well"][0] for b in it]
    proxy.failures.pop(dead)
    assert wells == ["A01", "A03"]
    assert it.stats()["fields_skipped"] == 1 and proxy.gets[dead] - gets_before == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped field" in r.getMessage()]
    assert len(skipped) == 1 and f"s3:/{dead}" in skipped[0] and "after 3 attempts" in skipped[0]


def test_missing_object_is_not_retried(s3, tmp_path):
    _, proxy, endpoint = s3
    missing = f"/{BUCKET}/no/such.tif"
    reader = FileReader(endpoint_url=endpoint, retries=3, backoff_s=0.01)
    with pytest.raises(ReadError, match=f"s3://{BUCKET}/no/such.tif"):
        reader.read_image(f"s3://{BUCKET}/no/such.tif")
    assert proxy.requests[missing] == 1 and reader.retried == 0


def test_cache_is_bounded_least_recently_used_first(tmp_path):
    reader = FileReader(cache_dir=str(tmp_path), cache_max_bytes=2500)
    paths = [reader._cache_path(f"s3://b/{i}.tif") for i in range(3)]
    for i, p in enumerate(paths):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
    os.utime(paths[0], (2000, 2000))  # read most recently
    assert reader.evict() == 1000
    assert [os.path.exists(p) for p in paths] == [True, False, True]
