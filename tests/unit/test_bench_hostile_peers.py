"""The pure parts of `bench hostile`'s peers: rows, DICOM bytes, the RSS sampler, cells."""

from __future__ import annotations

import argparse
import itertools
import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ

from abdoserve.loadtests.bench import hostile, hostile_peers
from abdoserve.loadtests.bench.hostile_peers import (
    GuardCase,
    PeakRss,
    PeerRow,
    associate_rq,
    associators_outcome,
    pdu_item,
    streams_outcome,
)
from abdoserve.loadtests.slow_streams import StreamEnd

VERIFICATION = "1.2.840.10008.1.1"


def row(answered: int = 5, attempted: int = 5) -> PeerRow:
    return PeerRow("case", "what", "ended", "1.00 s", 2.25, answered, attempted, "calls")


def test_a_row_has_the_six_cells_of_the_header() -> None:
    header = hostile_peers.PEER_HEADER.splitlines()[0]
    line = row().markdown()
    assert line == "| case | what | ended | 1.00 s | 2.2 MiB | yes: 5/5 calls |"
    assert line.count("|") == header.count("|") == 7


@pytest.mark.parametrize(("answered", "attempted"), [(4, 5), (0, 0)])
def test_a_row_says_no_unless_every_honest_call_was_answered(answered: int, attempted: int) -> None:
    assert f"| NO: {answered}/{attempted} calls |" in row(answered, attempted).markdown()


def test_the_a_associate_rq_is_one_pynetdicom_decodes() -> None:
    data = associate_rq("ABDOSERVE", "MODALITY")
    assert data[0] == 0x01 and struct.unpack(">L", data[2:6])[0] == len(data) - 6
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    assert pdu.called_ae_title == "ABDOSERVE" and pdu.calling_ae_title == "MODALITY"
    assert pdu.application_context_name == "1.2.840.10008.3.1.1.1"
    (context,) = pdu.presentation_context
    assert context.context_id == 1
    assert context.abstract_syntax == VERIFICATION
    assert context.transfer_syntax == ["1.2.840.10008.1.2"]
    assert pdu.user_information is not None
    assert pdu.user_information.maximum_length == hostile_peers.MAX_PDU_BYTES


def test_a_pdu_item_carries_its_length() -> None:
    assert pdu_item(0x51, b"\x00\x00\x40\x00") == b"\x51\x00\x00\x04\x00\x00\x40\x00"


def test_the_bomb_header_claims_4_gib_for_an_a_associate_rq() -> None:
    header = hostile_peers.PDU_BOMB_HEADER
    kind, _, length = struct.unpack(">BBL", header)
    assert (kind, length) == (0x01, 2**32 - 1)


@pytest.mark.parametrize("title", ["", "   ", "SEVENTEEN_LETTERS", "MODALITÉ"])
def test_an_ae_title_that_does_not_fit_is_refused(title: str) -> None:
    with pytest.raises((ValueError, UnicodeEncodeError)):
        hostile_peers.ae_title(title)
    with pytest.raises(argparse.ArgumentTypeError):
        hostile.ae_title(title)


def test_the_sampler_reports_the_highest_reading_less_the_first() -> None:
    readings = iter([100.0, 120.0, 180.0, 110.0])
    sampler = PeakRss(lambda: next(readings), interval_s=3600)  # the thread never samples
    sampler.start()
    sampler.sample()
    sampler.sample()
    sampler.stop()  # the last reading, 110
    assert (sampler.before, sampler.peak, sampler.rise_mib) == (100.0, 180.0, 80.0)


def test_the_sampler_s_thread_catches_a_peak_that_comes_and_goes() -> None:
    # 50, then a spike of 90 for one reading, then 50 for good
    readings = itertools.chain([50.0, 50.0, 90.0], itertools.repeat(50.0))
    with PeakRss(lambda: next(readings), interval_s=0.001) as sampler:
        assert hostile_peers.wait_until(lambda: sampler.peak == 90.0, 5.0)
    assert sampler.rise_mib == 40.0


def test_a_process_that_is_gone_has_no_rss() -> None:
    assert hostile_peers.rss_mib(2**22 + 1) is None  # above the largest pid_max


def test_the_stream_cells_count_refusals_and_deadline_ends() -> None:
    case = GuardCase("127.0.0.1", 1, 1, streams=31, wait_s=150)
    ends = [StreamEnd(0.004 + i / 1000, 8) for i in range(24)]
    ends += [StreamEnd(6.02, 4)] * 6 + [StreamEnd(6.1, None)]
    outcome, took = streams_outcome(case, ends, still_open=0)
    assert outcome == (
        "24 refused at once (RESOURCE_EXHAUSTED); 7 held, 6 of them ended "
        "DEADLINE_EXCEEDED, 1 ended otherwise (reset or another status)"
    )
    assert took == "refused in 27.0 ms; held ones ended at 6.0 s"


def test_the_stream_cells_say_what_was_still_open() -> None:
    case = GuardCase("127.0.0.1", 1, 1, streams=4, wait_s=10)
    outcome, took = streams_outcome(case, [], still_open=4)
    assert outcome.endswith("0 of them ended DEADLINE_EXCEEDED, 4 still open after 10 s")
    assert took == "refused in 0.0 ms"


def test_the_associator_cells_split_at_once_from_held() -> None:
    closed = [0.002, 0.003, 0.001, 0.004, 10.02, 10.05, 10.01, 10.03]
    outcome, took = associators_outcome(closed, whole=0, wait_s=150)
    assert outcome == "4 closed at once, 4 held then dropped; no A-ASSOCIATE-RQ arrived whole"
    assert took == "at once in 0.00 s; held ones dropped at 10.1 s"


def test_the_associator_cells_say_what_was_still_open_or_whole() -> None:
    outcome, took = associators_outcome([None, None, 12.0], whole=1, wait_s=20)
    assert outcome == "0 closed at once, 1 held then dropped, 2 still open after 20 s; 1 " + (
        "A-ASSOCIATE-RQ arrived whole"
    )
    assert took == "none at once; held ones dropped at 12.0 s"


@pytest.mark.parametrize(
    ("text", "parsed"), [("127.0.0.1:11112", ("127.0.0.1", 11112)), ("h:1", ("h", 1))]
)
def test_host_port_parses(text: str, parsed: tuple[str, int]) -> None:
    assert hostile.host_port(text) == parsed


@pytest.mark.parametrize("text", ["11112", ":11112", "host:", "host:port"])
def test_host_port_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        hostile.host_port(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    hostile.add_arguments(parser)
    return parser.parse_args(["--server-pid", "1", *argv])


def test_the_gateway_cases_need_the_gateway_s_pid() -> None:
    assert hostile.gateway_case(parse()) is None
    with pytest.raises(SystemExit, match="--gateway needs --gateway-pid"):
        hostile.gateway_case(parse("--gateway", "127.0.0.1:11112"))
    case = hostile.gateway_case(parse("--gateway", "127.0.0.1:11112", "--gateway-pid", "7"))
    assert case == hostile_peers.GatewayCase("127.0.0.1", 11112, 7, "MODALITY", "ABDOSERVE", 150)


def test_an_explicit_guard_pid_is_taken_as_is() -> None:
    case = hostile.guard_case(parse("--host", "127.0.0.1:9", "--guard-pid", "42"))
    assert (case.host, case.port, case.master_pid) == ("127.0.0.1", 9, 42)


GATEWAY = hostile_peers.GatewayCase("127.0.0.1", 11112, 7, wait_s=150)


def test_a_bomb_row_gives_the_time_to_close_and_the_bytes_taken() -> None:
    result = hostile_peers.BombResult(GATEWAY, 1 << 30, 2_686_982, 0.0064, 0.3, (2, 2))
    assert result.row().markdown() == (
        "| a DICOM PDU claiming 4 GiB (gateway) | `01 00 FF FF FF FF` from 127.0.0.2, then "
        "zeros up to 1024 MiB | closed by the gateway; 2,686,982 bytes taken (header "
        "included) | closed in 6.4 ms | 0.3 MiB | yes: 2/2 C-ECHOs from 127.0.0.1 |"
    )


def test_a_bomb_row_says_when_the_connection_was_never_closed() -> None:
    result = hostile_peers.BombResult(GATEWAY, 1 << 30, 1 << 30, None, 2048.0, (0, 3))
    cells = result.row().markdown().split(" | ")
    assert cells[2] == "still open after 150 s; 1,073,741,824 bytes taken (header included)"
    assert cells[3:] == ["never closed", "2048.0 MiB", "NO: 0/3 C-ECHOs from 127.0.0.1 |"]


def test_an_associators_row_counts_the_connections_and_the_request_bytes() -> None:
    closed = (0.01,) * 4 + (10.0,) * 4
    result = hostile_peers.AssociatorsResult(
        GATEWAY, 161, closed, (1,) * 4 + (10,) * 4, 0.7, (6, 6)
    )
    cells = result.row().markdown().split(" | ")
    assert cells[0] == "| 8 slow associators (gateway)"
    assert cells[1] == (
        "8 connections from 127.0.0.2, each a valid 161-byte A-ASSOCIATE-RQ at 1 byte/s"
    )
    assert cells[2].endswith("no A-ASSOCIATE-RQ arrived whole")


def test_a_streams_row_takes_the_cells_of_its_ends() -> None:
    case = GuardCase("127.0.0.1", 1, 1, honest_calls=5, streams=3)
    ends = (StreamEnd(0.01, 8), StreamEnd(6.0, 4), StreamEnd(6.0, 4))
    result = hostile_peers.StreamsResult(case, ends, 0, 1.2, 5)
    assert result.seconds(8) == [0.01] and result.seconds(4) == [6.0, 6.0]
    cells = result.row().markdown().split(" | ")
    assert (
        cells[2]
        == "1 refused at once (RESOURCE_EXHAUSTED); 2 held, 2 of them ended DEADLINE_EXCEEDED"
    )
    assert cells[5] == "yes: 5/5 bone_density_ct calls from 127.0.0.1 |"


def test_the_frozen_server_row_says_what_happened() -> None:
    from abdoserve.loadtests.bench.frozen_server import FreezeResult

    healed = FreezeResult(0.41, "UNAVAILABLE", 12.3, True, "bone_density_ct").row().markdown()
    assert "ended UNAVAILABLE; the frozen server killed" in healed
    assert "call ended in 0.41 s; answered again after 12.3 s" in healed and "yes: 1/1" in healed
    stuck = FreezeResult(60.0, "DEADLINE_EXCEEDED", None, False, "bone_density_ct").row()
    assert "NOT killed" in stuck.markdown() and "NO: 0/1" in stuck.markdown()
