"""One gRPC channel over one or several AbdoServe endpoints, balanced by gRPC's round_robin.

`url` may be a single target (`"host:8001"`, `"dns:///abdoserve.hospital.local:8001"`:
every address of the name), a comma-separated list (`"hostA:8001,hostB:8001"`) or a
sequence of `HOST:PORT` strings. Every form becomes ONE channel with the `round_robin`
policy: gRPC keeps a connection to each address, sends each call to the next READY one
and never picks one that is down (TRANSIENT_FAILURE) or still connecting, so a dead
endpoint costs no call any waiting, and a retry after UNAVAILABLE lands on another.

gRPC's own resolvers express a list of IP literals (`ipv4:a:p,b:p`, `ipv6:[a]:p,...`)
but no list of host names (`dns:` takes one name). Host names in a list are therefore
resolved here, once, when the client is made (`socket.getaddrinfo`), and the channel
gets the addresses. We chose that over one channel per endpoint rotated by the client:
gRPC's policy then does the balancing and the skipping of dead endpoints, the same way
for every form. The costs: the addresses of a list are fixed for the client's life (a
`dns:///` name is re-resolved by gRPC), and one channel checks one TLS server name, so a
TLS list needs every server's certificate to carry one shared name (`tls_server_name`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from abdoserve_client.errors import ServerUnavailableError

log = logging.getLogger("abdoserve_client")

ROUND_ROBIN: tuple[str, Any] = ("grpc.lb_policy_name", "round_robin")
# Schemes gRPC resolves itself: such a string is already a channel target.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")

Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class ChannelTarget:
    """What `grpc.*_channel` gets: the target string and the options that go with it."""

    target: str
    options: tuple[tuple[str, Any], ...]


def endpoint_list(url: str | Sequence[str]) -> list[str]:
    """The endpoints as given: a string split at commas (unless a gRPC target), or the sequence."""
    if isinstance(url, str):
        if url.startswith(GRPC_SCHEMES):
            return [url]
        parts = url.split(",")
    else:
        parts = list(url)
    endpoints = [part.strip() for part in parts if part.strip()]
    if not endpoints:
        raise ValueError("no endpoint given")
    return endpoints


def describe(url: str | Sequence[str]) -> str:
    """The endpoints as one string, for messages."""
    return url if isinstance(url, str) else ",".join(url)


def split_host_port(endpoint: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); a list entry must name its port."""
    host, colon, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"endpoint {endpoint!r}: write an IPv6 address as [address]:port")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address of `host`, as gRPC's DNS resolver would list them (IPv6 and IPv4)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def channel_target(
    url: str | Sequence[str],
    *,
    ssl: bool,
    tls_server_name: str | None = None,
    resolve: Resolver = resolve_host,
) -> ChannelTarget:
    """The round_robin channel target for one endpoint, a gRPC target, or a list."""
    endpoints = endpoint_list(url)
    if len(endpoints) == 1:
        # One target, passed on as today; round_robin spreads a name's several addresses.
        return ChannelTarget(endpoints[0], _options(tls_server_name))
    hosts = [split_host_port(endpoint) for endpoint in endpoints]
    return ChannelTarget(
        address_target(_addresses(hosts, resolve)),
        _options(_list_authority(hosts, ssl, tls_server_name)),
    )


def _options(authority: str | None) -> tuple[tuple[str, Any], ...]:
    if authority is None:
        return (ROUND_ROBIN,)
    # The name the TLS handshake checks, and the :authority every call carries.
    return (ROUND_ROBIN, ("grpc.default_authority", authority))


def _list_authority(
    hosts: Sequence[tuple[str, int]], ssl: bool, tls_server_name: str | None
) -> str | None:
    """The one server name of a list's channel: given, or the host all entries share."""
    if tls_server_name is not None or not ssl:
        return tls_server_name
    names = {host for host, _ in hosts}
    if len(names) == 1:
        (name,) = names
        return f"[{name}]" if ":" in name else name
    raise ValueError(
        "TLS over a list of different hosts needs tls_server_name: the one name every "
        "server's certificate carries (one channel checks one name); or give a dns:/// name"
    )


def _addresses(hosts: Sequence[tuple[str, int]], resolve: Resolver) -> list[tuple[str, int]]:
    """IP literals as they are, host names resolved; hosts that do not resolve are left out."""
    addresses: list[tuple[str, int]] = []
    for host, port in hosts:
        if _is_ip(host):
            addresses.append((host, port))
            continue
        try:
            addresses += [(address, port) for address in resolve(host, port)]
        except OSError as error:
            log.warning("endpoint %s:%d left out: it does not resolve (%s)", host, port, error)
    if not addresses:
        listed = ",".join(f"{host}:{port}" for host, port in hosts)
        raise ServerUnavailableError(f"none of the endpoints {listed} resolves")
    return list(dict.fromkeys(addresses))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_target(addresses: Sequence[tuple[str, int]]) -> str:
    """`ipv4:a:p,b:p` when all are IPv4, else `ipv6:[a]:p,...` (IPv4 written v4-mapped,
    as gRPC itself connects to IPv4 on a dual-stack socket)."""
    parsed = [(ipaddress.ip_address(address), port) for address, port in addresses]
    if all(isinstance(address, ipaddress.IPv4Address) for address, _ in parsed):
        return "ipv4:" + ",".join(f"{address}:{port}" for address, port in parsed)
    return "ipv6:" + ",".join(f"[{_as_v6(address)}]:{port}" for address, port in parsed)


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv4Address):
        return f"::ffff:{address}"
    return str(address)
