"""Real DICOM peers for the gateway's tests and benchmark: a PACS and a modality.

Debian's Orthanc is the PACS: `start_orthanc` runs one on free local ports with its
storage in a given folder and only our own configuration file (so none of Debian's
plugins load), and `Orthanc` reads what arrived through its REST API. dcmtk's
`storescu` and `echoscu` are the modality.

storescu by default proposes only uncompressed transfer syntaxes and converts each
file to one of them: it silently decompresses RLE and refuses JPEG 2000 outright. A
modality sends what it has, so `storescu` here writes an association profile that
proposes each file's own transfer syntax (plus an uncompressed fallback per SOP class).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pydicom import uid
from pydicom.filereader import read_file_meta_info

from abdoserve.deploy import processes
from abdoserve.deploy.embedded import free_port

__all__ = [
    "DcmtkError",
    "Orthanc",
    "PeerError",
    "echoscu",
    "free_port",
    "orthanc",
    "start_orthanc",
    "storescu",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
INSTALL_HINT = "run `make install` (Debian packages orthanc and dcmtk)"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3  # free_port() can race with another process for the port
UNCOMPRESSED: tuple[str, ...] = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
MAX_PRESENTATION_CONTEXTS = 128  # the DICOM limit (odd context ids 1..255)
LOG_TAIL_CHARS = 3000


class PeerError(RuntimeError):
    """A peer could not be started, or its REST API answered an error."""


class PortInUseError(PeerError):
    """Orthanc could not bind one of its ports (another process took it)."""


class DcmtkError(subprocess.CalledProcessError):
    """A dcmtk tool failed; unlike CalledProcessError, the message shows its output."""

    def __str__(self) -> str:
        output = f"{self.stdout or ''}{self.stderr or ''}".strip()
        return f"{super().__str__()}\n{output[-LOG_TAIL_CHARS:]}"


def orthanc_binary() -> Path:
    if not ORTHANC_BINARY.exists():
        raise PeerError(f"{ORTHANC_BINARY} is missing: {INSTALL_HINT}")
    return ORTHANC_BINARY


def dcmtk_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise PeerError(f"dcmtk's {name} is missing: {INSTALL_HINT}")
    return found


def orthanc_config(
    *,
    folder: Path,
    dicom_port: int,
    http_port: int,
    aet: str,
    allowed_callers: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """Orthanc's configuration: a loopback-only, throwaway PACS.

    `allowed_callers` (AE title -> (host, port)): None lets any caller echo and store;
    given, only those AE titles from those hosts may associate, and they are registered
    as modalities (so Orthanc can also send to them, e.g. /modalities/{aet}/store)."""
    restricted = allowed_callers is not None
    modalities = {
        name: {"AET": name, "Host": host, "Port": port}
        for name, (host, port) in (allowed_callers or {}).items()
    }
    return {
        "Name": f"abdoserve-test-{aet}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        # An explicit empty list: Debian's /etc/orthanc config (not read) loads plugins.
        "Plugins": [],
        "HttpPort": http_port,
        # Orthanc 1.10 has no bind-address option: it listens on every interface, so
        # the REST API refuses non-loopback clients instead. No users: a test instance.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        # A real PACS refuses an association addressed to another AE title.
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": not restricted,
        "DicomAlwaysAllowStore": not restricted,
        "DicomCheckModalityHost": restricted,
        "StrictAetComparison": restricted,
        "DicomModalities": modalities,
        # Every DICOM transfer syntax (1.2.840.10008.1.2*): files are kept as received.
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": False,
        "StorageCompression": False,
        # Studies become stable (and their Lua/plugin events fire) after seconds, not 60.
        "StableAge": 2,
        "SaveJobs": False,
        # Throwaway storage: no fsync per file (stop() still shuts Orthanc down cleanly).
        "SyncStorageArea": False,
    }


@dataclass(eq=False)
class Orthanc:
    """A real Orthanc on free ports with its own storage in a temp folder."""

    dicom_port: int
    http_port: int
    aet: str
    folder: Path
    verbose: bool = False
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _output: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_file(self) -> Path:
        return self.folder / "orthanc.json"

    @property
    def log_file(self) -> Path:
        """Orthanc's log (appended to across restarts)."""
        return self.folder / "orthanc.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        verbosity = ["--verbose"] if self.verbose else []
        # Only our configuration file: with no argument Orthanc would use its
        # built-in defaults, and Debian's service reads /etc/orthanc/ (with plugins).
        return [
            str(orthanc_binary()),
            *verbosity,
            f"--logfile={self.log_file}",
            "--no-jobs",
            str(self.config_file),
        ]

    def start(self) -> None:
        """(Re)start this instance (same storage, same ports); ready when /system answers.
        Orthanc opens its DICOM port before its HTTP port, so DICOM is up by then too."""
        if self.running:
            self.stop()
        if not self.config_file.exists():
            raise PeerError(f"{self.config_file} is missing: use start_orthanc()")
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Anything Orthanc prints before its log is open lands in the same file.
        self._output = self.log_file.open("ab")
        self.process = processes.start(
            self.command(),
            stdout=self._output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.folder,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.is_ready():
            if self.process.poll() is not None:
                self.stop()
                log = self.log_tail(log_start)
                kind = PortInUseError if "already in use" in log else PeerError
                raise kind(f"Orthanc exited early; {self.log_file}:\n{log}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"Orthanc not ready in {self.startup_timeout_s} s; {self.log_file}:\n"
                    + self.log_tail(log_start)
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM and wait: Orthanc closes its index cleanly (the "PACS is down" fault)."""
        process, self.process = self.process, None
        processes.stop(process, grace_s=STOP_TIMEOUT_S)
        if self._output is not None:
            self._output.close()
            self._output = None

    def close(self) -> None:
        """Stop it (for a fixture's teardown); the storage stays in `folder`."""
        self.stop()

    def __enter__(self) -> Orthanc:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, offset: int = 0) -> str:
        if not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")[-LOG_TAIL_CHARS:]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # refused, reset or timed out while it starts
            return False

    def request(self, method: str, path: str, body: object = None) -> bytes:
        """The raw answer of a REST call (`path` starts with /); PeerError on an error."""
        data = None if body is None else json.dumps(body).encode()
        call = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(call, timeout=30) as response:
                answer: bytes = response.read()
                return answer
        except urllib.error.HTTPError as error:
            raise PeerError(f"{method} {path}: {error.code} {error.read().decode()}") from error

    def get(self, path: str) -> Any:
        """A REST GET's JSON answer, e.g. get("/statistics")."""
        return json.loads(self.request("GET", path))

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        ids: list[str] = self.get("/instances")
        return ids

    def find_instances(self, **tags: str) -> list[dict[str, Any]]:
        """/tools/find at Instance level (tags of any level match, e.g. Modality="SR",
        StudyInstanceUID=...; C-FIND wildcards apply), expanded: ID, ParentSeries,
        MainDicomTags (SOPInstanceUID, InstanceNumber, ...)."""
        query = {"Level": "Instance", "Query": tags, "Expand": True}
        found: list[dict[str, Any]] = json.loads(self.request("POST", "/tools/find", query))
        return found

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file: the dataset as received, with Orthanc's file meta."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        """Orthanc's metadata of an instance: TransferSyntax, RemoteAET, CalledAET, ..."""
        found: dict[str, str] = self.get(f"/instances/{orthanc_id}/metadata?expand")
        return found

    def sop_instance_uids(self, modality: str | None = None) -> set[str]:
        query = {} if modality is None else {"Modality": modality}
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in self.find_instances(**query)}

    def wait_for_instances(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float, **tags: str
    ) -> list[dict[str, Any]]:
        """Poll find_instances(**tags) (all instances by default) until `predicate`
        holds for the list; AssertionError with what was last seen on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.find_instances(**tags)
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                seen = [item["MainDicomTags"] for item in found]
                raise AssertionError(
                    f"Orthanc {self.aet}: after {timeout_s} s, {len(found)} instance(s)"
                    f" matching {tags or 'anything'} and the predicate still false: {seen}"
                )
            time.sleep(0.2)

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")


def start_orthanc(
    folder: Path,
    *,
    aet: str = "ORTHANC",
    allowed_callers: Mapping[str, tuple[str, int]] | None = None,
    verbose: bool = False,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Orthanc:
    """Write folder/orthanc.json (free ports, storage and index in `folder`, log in
    folder/orthanc.log) and start Orthanc; see `orthanc_config` for the choices.
    `verbose` logs each association and C-STORE (Orthanc's --verbose)."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        instance = Orthanc(
            dicom_port=free_port(),
            http_port=free_port(),
            aet=aet,
            folder=folder,
            verbose=verbose,
            startup_timeout_s=startup_timeout_s,
        )
        config = orthanc_config(
            folder=folder,
            dicom_port=instance.dicom_port,
            http_port=instance.http_port,
            aet=aet,
            allowed_callers=allowed_callers,
        )
        instance.config_file.write_text(json.dumps(config, indent=2) + "\n")
        try:
            instance.start()
        except PortInUseError:
            if attempt == PORT_ATTEMPTS:
                raise
            continue
        return instance
    raise AssertionError("unreachable")


@contextlib.contextmanager
def orthanc(
    folder: Path,
    *,
    aet: str = "ORTHANC",
    allowed_callers: Mapping[str, tuple[str, int]] | None = None,
    verbose: bool = False,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[Orthanc]:
    """start_orthanc, yield it, always stop it."""
    instance = start_orthanc(
        folder,
        aet=aet,
        allowed_callers=allowed_callers,
        verbose=verbose,
        startup_timeout_s=startup_timeout_s,
    )
    try:
        yield instance
    finally:
        instance.stop()


def association_profile(paths: Sequence[Path]) -> str:
    """A dcmtk association config (profile "Files") proposing, per SOP class, each
    transfer syntax the files have (a context of its own) and the uncompressed ones."""
    wanted: dict[str, set[str]] = {}
    for path in paths:
        meta = read_file_meta_info(path)
        sop_class = meta.get("MediaStorageSOPClassUID")
        syntax = meta.get("TransferSyntaxUID")
        if sop_class is None or syntax is None:
            raise ValueError(f"{path}: no file meta (SOP class and transfer syntax)")
        wanted.setdefault(str(sop_class), set()).add(str(syntax))
    groups: dict[tuple[str, ...], str] = {}
    contexts: list[str] = []
    for sop_class, syntaxes in sorted(wanted.items()):
        proposals: list[tuple[str, ...]] = [(syntax,) for syntax in sorted(syntaxes)]
        proposals.append(UNCOMPRESSED)
        for proposal in proposals:
            group = groups.setdefault(proposal, f"Syntaxes{len(groups) + 1}")
            contexts.append(f"{sop_class}\\{group}")
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts: more than one association")
    lines = ["[[TransferSyntaxes]]"]
    for listed, group in groups.items():
        lines.append(f"[{group}]")
        lines += [f"TransferSyntax{n} = {syntax}" for n, syntax in enumerate(listed, 1)]
    lines += ["[[PresentationContexts]]", "[Files]"]
    lines += [f"PresentationContext{n} = {item}" for n, item in enumerate(contexts, 1)]
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = Files"]
    return "\n".join(lines) + "\n"


def run_dcmtk(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    result = processes.run(command, timeout_s=timeout_s, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise DcmtkError(result.returncode, command, result.stdout, result.stderr)
    return result


def network_options(called_aet: str, calling_aet: str, timeout_s: float) -> list[str]:
    # Connect, ACSE and DIMSE timeouts: a peer that accepts but never answers fails.
    seconds = str(max(1, round(timeout_s)))
    return ["-aet", calling_aet, "-aec", called_aet, "-to", seconds, "-ta", seconds, "-td", seconds]


def storescu(
    paths: Sequence[Path],
    *,
    port: int,
    host: str = "127.0.0.1",
    called_aet: str,
    calling_aet: str = "MODALITY",
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Send the files in one association, each in its own transfer syntax; DcmtkError
    (a CalledProcessError) when any store fails. storescu stops at the first refused
    file and exits with the status' high byte (e.g. 167 for A700); warnings exit 0.
    Its verbose log (one line per file and response) is in the result's stderr."""
    if not paths:
        raise ValueError("no files to send")
    with tempfile.TemporaryDirectory(prefix="abdoserve-storescu-") as scratch:
        profile = Path(scratch) / "storescu.cfg"
        profile.write_text(association_profile(paths))
        command = [
            dcmtk_binary("storescu"),
            "-v",
            *network_options(called_aet, calling_aet, timeout_s),
            "-xf",
            str(profile),
            "Files",
            host,
            str(port),
            *map(str, paths),
        ]
        return run_dcmtk(command, timeout_s)


def echoscu(
    *, port: int, host: str = "127.0.0.1", called_aet: str, calling_aet: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """C-ECHO; DcmtkError (a CalledProcessError) when refused or nobody listens."""
    timeout_s = 30.0
    command = [
        dcmtk_binary("echoscu"),
        "-v",
        *network_options(called_aet, calling_aet, timeout_s),
        host,
        str(port),
    ]
    return run_dcmtk(command, timeout_s)
