"""The guard's nginx configuration: accepted by the real nginx, and saying what it bounds."""

from __future__ import annotations

import subprocess
from pathlib import Path

from abdoserve.deploy.guard import GuardOptions, nginx_binary, render_config
from abdoserve.deploy.supervisor import GuardLimits

OPTIONS = GuardOptions(
    host="127.0.0.1",
    grpc_port=18001,
    http_port=18000,
    upstream_grpc_port=28001,
    upstream_http_port=28000,
    max_body_bytes=257 * 1024 * 1024,
    max_inflight=31,
    body_timeout_s=30,
)


def test_nginx_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(render_config(OPTIONS, tmp_path))
    checked = subprocess.run(
        [nginx_binary(), "-p", str(tmp_path), "-c", str(config), "-t"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_the_configuration_carries_every_limit() -> None:
    text = render_config(OPTIONS, Path("/run/guard"))
    assert f"client_max_body_size {257 * 1024 * 1024};" in text
    assert "client_body_timeout 30s;" in text and "client_header_timeout 30s;" in text
    assert text.count("limit_conn inflight 31;") == 2  # gRPC and HTTP share one budget
    assert "grpc_pass grpc://triton_grpc;" in text
    assert "server 127.0.0.1:28001;" in text and "listen 127.0.0.1:18001 http2;" in text
    assert 'grpc-message "request exceeds the limit of 269484032 bytes' in text
    assert "add_header grpc-status 8 always;" in text  # RESOURCE_EXHAUSTED


def test_the_byte_budget_becomes_a_request_count_at_the_largest_size() -> None:
    assert GuardLimits(257 * 1024**2, max_inflight_bytes=8 * 1024**3).max_inflight == 31
    assert GuardLimits(8 * 1024**2, max_inflight_bytes=16 * 1024**2).max_inflight == 2
    assert GuardLimits(8 * 1024**2, max_inflight_bytes=1).max_inflight == 1
