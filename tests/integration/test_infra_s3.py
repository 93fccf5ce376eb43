"""infra/s3: the development S3 server starts on loopback, serves boto3, and stops without a trace."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import boto3
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_up_serves_buckets_and_down_stops_the_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SEERLIKE_S3_PORT=str(port), SEERLIKE_S3_STATE=str(tmp_path / "s3"))
    up = subprocess.run([str(ROOT / "infra/s3/up"), "seerlike-dev"], capture_output=True, text=True, env=env, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in up.stdout
        creds = dict(re.findall(r"export (AWS_\w+)=(\S+)", up.stdout))
        s3 = boto3.client("s3", endpoint_url=creds["AWS_ENDPOINT_URL"], aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name=creds["AWS_DEFAULT_REGION"])
        s3.put_object(Bucket="seerlike-dev", Key="a/b.txt", Body=b"hello")
        assert s3.get_object(Bucket="seerlike-dev", Key="a/b.txt")["Body"].read() == b"hello"
        st = subprocess.run([str(ROOT / "infra/s3/status")], capture_output=True, text=True, env=env, timeout=60)
        assert st.returncode == 0 and "bucket: seerlike-dev" in st.stdout
        pid = int((tmp_path / "s3/moto.pid").read_text())
    finally:
        down = subprocess.run([str(ROOT / "infra/s3/down")], capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 0, down.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert subprocess.run([str(ROOT / "infra/s3/status")], env=env, capture_output=True).returncode == 1
