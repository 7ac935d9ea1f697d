"""The guard's nginx configuration: accepted by the real nginx, and saying what it bounds."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

from abdoserve.deploy.guard import (
    Backend,
    GuardLimits,
    GuardOptions,
    ProxiedPort,
    TlsFiles,
    ensure_worker_user,
    nginx_binary,
    render_config,
    worker_directory,
)

OPTIONS = GuardOptions(
    host="127.0.0.1",
    grpc_port=18001,
    http_port=18000,
    upstream_grpc_port=28001,
    upstream_http_port=28000,
    limits=GuardLimits(257 * 1024 * 1024, max_inflight_bytes=31 * 257 * 1024 * 1024),
)


def assert_nginx_accepts(text: str, folder: Path) -> None:
    """The real nginx's `-t` on the configuration `text`."""
    if os.geteuid() == 0:  # as root, the workers' own user must exist
        ensure_worker_user()
    worker_directory(folder).mkdir(exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(text)
    checked = subprocess.run(
        [nginx_binary(), "-p", str(folder), "-c", str(config), "-t"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_nginx_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    assert_nginx_accepts(render_config(OPTIONS, tmp_path), tmp_path)


def test_the_configuration_carries_every_limit() -> None:
    text = render_config(OPTIONS, Path("/run/guard"))
    assert f"client_max_body_size {257 * 1024 * 1024};" in text
    assert "client_body_timeout 30s;" in text and "client_header_timeout 30s;" in text
    # gRPC and HTTP share one budget, model-repository calls included
    assert text.count("limit_conn inflight 31;") == 4
    assert text.count("limit_conn per_client 15;") == 3  # half of it per address
    assert text.count("limit_conn probes 16;") == 2  # health outside the budget
    assert "grpc_set_header grpc-timeout 120S;" in text  # the call's whole time
    assert "grpc_pass grpc://triton_grpc;" in text
    assert "server 127.0.0.1:28001 max_fails=1 fail_timeout=5s;" in text
    assert "listen 127.0.0.1:18001 http2;" in text
    assert 'grpc-message "request exceeds the limit of 269484032 bytes' in text
    assert "add_header grpc-status 8 always;" in text  # RESOURCE_EXHAUSTED


def test_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    limits = replace(OPTIONS.limits, trusted_proxies=("10.0.0.0/8",))
    text = render_config(replace(OPTIONS, limits=limits), tmp_path)
    assert_nginx_accepts(text, tmp_path)
    assert "set_real_ip_from 10.0.0.0/8;" in text and "real_ip_header X-Forwarded-For;" in text
    assert "set_real_ip_from" not in render_config(OPTIONS, tmp_path)


def test_the_byte_budget_becomes_a_request_count_at_the_largest_size() -> None:
    assert GuardLimits(257 * 1024**2, max_inflight_bytes=8 * 1024**3).max_inflight == 31
    assert GuardLimits(8 * 1024**2, max_inflight_bytes=16 * 1024**2).max_inflight == 2
    assert GuardLimits(8 * 1024**2, max_inflight_bytes=1).max_inflight == 1


def test_nginx_accepts_tls_mutual_tls_proxied_ports_and_the_upstream_key(tmp_path: Path) -> None:
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    options = replace(
        OPTIONS,
        tls=TlsFiles(pki.server.certificate, pki.server.key, client_ca=pki.ca),
        proxied=(ProxiedPort(18002, 28002), ProxiedPort(18003, 28003)),
        upstream_key="k3y",
    )
    text = render_config(options, tmp_path)
    assert_nginx_accepts(text, tmp_path)
    assert text.count(" ssl") >= 4 and "ssl_verify_client on;" in text
    assert "listen 127.0.0.1:18001 ssl http2;" in text
    assert "add_header grpc-status 16 always;" in text  # UNAUTHENTICATED without a cert
    # Probes and scrapes bypass the in-flight budget; the key is set, never passed on.
    assert text.count("limit_conn inflight") == 4
    assert "proxy_pass http://127.0.0.1:28003;" in text
    assert "grpc_set_header triton-grpc-protocol-abdoserve-guard-key k3y;" in text
    assert "proxy_set_header abdoserve-guard-key k3y;" in text


def test_a_clients_model_repository_calls_keep_to_one_server(tmp_path: Path) -> None:
    """`abdoserve model canary` loads versions, then reads them back: on one replica."""
    backends = (Backend(28001, 28000), Backend(28011, 28010, up=False))
    text = render_config(replace(OPTIONS, backends=backends), tmp_path)
    assert_nginx_accepts(text, tmp_path)
    for name in ("triton_repository_grpc", "triton_repository_http"):
        upstream = next(line for line in text.splitlines() if f"upstream {name} " in line)
        assert "hash $remote_addr consistent;" in upstream
        # Not ready for a moment (a model load) is no reason to send the next call elsewhere.
        assert " down" not in upstream
    assert "grpc_pass grpc://triton_repository_grpc;" in text
    assert "proxy_pass http://triton_repository_http;" in text
    assert r"(Repository\w+|ModelConfig)$" in text


def test_without_tls_no_listener_speaks_it() -> None:
    text = render_config(replace(OPTIONS, proxied=(ProxiedPort(18002, 28002),)), Path("/g"))
    assert "ssl" not in text and "guard-key" not in text


def test_replicas_are_balanced_and_one_not_up_gets_no_new_request(tmp_path: Path) -> None:
    backends = (Backend(28001, 28000), Backend(28011, 28010, up=False), Backend(28021, 28020))
    text = render_config(replace(OPTIONS, backends=backends), tmp_path)
    assert (
        "upstream triton_grpc { server 127.0.0.1:28001 max_fails=1 fail_timeout=5s; "
        "server 127.0.0.1:28011 down; server 127.0.0.1:28021 max_fails=1 fail_timeout=5s;"
    ) in text
    assert "server 127.0.0.1:28010 down;" in text
    # A request whose Triton died mid-way is sent once more, elsewhere (idempotent).
    assert "grpc_next_upstream error timeout non_idempotent;" in text
    assert_nginx_accepts(text, tmp_path)


def test_tls_1_2_agrees_only_on_forward_secret_aead_suites(tmp_path: Path) -> None:
    """OpenSSL's own reading of the list: ECDHE key exchange, AES-GCM or ChaCha20 only
    (nginx's default, HIGH:!aNULL:!MD5, held AES128-SHA: RSA key exchange, CBC)."""
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    text = render_config(
        replace(OPTIONS, tls=TlsFiles(pki.server.certificate, pki.server.key)), tmp_path
    )
    assert_nginx_accepts(text, tmp_path)
    listed = text.split("ssl_ciphers ", 1)[1].split(";", 1)[0]
    assert "ssl_prefer_server_ciphers on;" in text
    suites = subprocess.run(
        ["openssl", "ciphers", "-v", listed], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    tls12 = [line.split() for line in suites if " TLSv1.2 " in line]
    assert len(tls12) == 6, suites  # AES128-GCM, AES256-GCM, ChaCha20; ECDSA and RSA
    assert {(fields[2], fields[5]) for fields in tls12} == {("Kx=ECDH", "Mac=AEAD")}
    assert "AES128-SHA" not in {fields[0] for fields in tls12}


def test_nginx_names_no_version() -> None:
    assert "server_tokens off;" in render_config(OPTIONS, Path("/run/guard"))
