"""el2trace's stream decoder on a recorded golden (tests/golden/el2trace-6.12: a 6.12 boot from
power-on and `pkvm_guest --vms 2`, recorded by tests/golden/record_el2trace.py on QEMU 10)."""

from __future__ import annotations

import json
import lzma
import struct
from collections import Counter
from pathlib import Path

import pytest

from harness.el2.tcg.probes import Layout
from harness.el2.tcg.stream import HEADER, PROBE, Calls, Follower, HostCall, StreamError, decode_file, read_records
from harness.el2.trace import pools_from_json
from harness.model.replay import Replayer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "el2trace-6.12"
KVM_HOST_SMCCC = 0xC600_0000      # ARM_SMCCC_CALL_VAL(FAST_CALL, SMC_64, VENDOR_HYP, 0)


@pytest.fixture(scope="module")
def stream() -> bytes:
    return lzma.decompress((GOLDEN / "el2trace.bin.xz").read_bytes())


@pytest.fixture(scope="module")
def layout() -> Layout:
    return Layout.from_json((GOLDEN / "el2trace-layout.json").read_text())


@pytest.fixture(scope="module")
def final() -> dict:
    saved = json.loads(lzma.decompress((GOLDEN / "snapshot-final.json.xz").read_bytes()))
    return pools_from_json(saved["pools"])


def _calls(stream: bytes, layout: Layout) -> tuple[Calls, list, list[HostCall]]:
    records, used = read_records(stream)
    assert used == len(stream)
    calls = Calls(layout)
    ops, host_calls = calls.feed(records)
    return calls, ops + calls.flush(), host_calls


def test_records_are_whole_and_in_sequence(stream):
    records, used = read_records(stream)
    assert used == len(stream) and len(records) > 10_000
    calls = [r.seq for r in records if r.type not in (3, 4)]      # the block counts and stats come at exit
    assert calls == list(range(len(calls)))
    assert all(r.seq > calls[-1] for r in records if r.type in (3, 4))
    assert Counter(r.type for r in records).keys() == {1, 2, 3, 4, 5}
    assert {r.vcpu for r in records if r.type == PROBE} == {0, 1}


def test_a_stream_read_in_pieces_gives_the_same_records(stream, tmp_path):
    path = tmp_path / "el2trace.bin"
    follower = Follower(path)
    whole, _ = read_records(stream)
    got = []
    path.write_bytes(b"")
    for end in range(0, len(stream) + 99_999, 99_999):       # cuts fall inside records
        path.write_bytes(stream[:end])
        got += follower.new_records()
    assert got == whole


def test_garbage_is_refused():
    with pytest.raises(StreamError, match="no el2trace record at byte 0"):
        read_records(HEADER.pack(4, 9, 0, 0, 0, 0, 0, 0))


def test_the_trace_starts_at_the_pools_inits(stream, layout):
    calls, ops, _ = _calls(stream, layout)
    names = calls.pool_names()
    assert sorted(names.values()) == ["host_s2_pool", "hpool"]
    inits = [op for op in ops if op.op == "init"]
    assert [names.get(op.pool) for op in inits[:2]] == ["hpool", "host_s2_pool"]
    assert ops[0].op == "init"                 # nothing is allocated before hpool exists
    assert len(inits) == 4                     # and one pool per VM


def test_host_hypercalls_are_kvm_smccc_calls_with_results(stream, layout):
    _, _, host_calls = _calls(stream, layout)
    assert len(host_calls) > 20
    assert all(c.function & 0xFFFF_0000 == KVM_HOST_SMCCC for c in host_calls)
    assert all(c.result is not None and c.result[0] == 0 for c in host_calls)   # SMCCC_RET_SUCCESS


def test_the_golden_replays_from_power_on_to_its_final_snapshot(stream, layout, final):
    calls, ops, _ = _calls(stream, layout)
    replayer = Replayer({}, layout.kernel_version, calls.pool_names())
    assert replayer.feed(ops) is None
    assert replayer.compare(final) == []
    assert replayer.per_pool["hpool"]["get"] > 1000


def test_a_put_missing_from_the_stream_is_a_divergence(stream, layout):
    """Drop the entry and return of one hyp_put_page: the model must notice, at the page's next call."""
    records, _ = read_records(stream)
    put = layout.functions.index("hyp_put_page")
    first = next(i for i, r in enumerate(records) if r.type == PROBE and r.fn == put and r.kind == "e")
    last = next(i for i in range(first + 1, len(records))
                if records[i].fn == put and records[i].kind == "r" and records[i].vcpu == records[first].vcpu)
    calls = Calls(layout)
    ops, _ = calls.feed(records[:first] + records[first + 1:last] + records[last + 1:])
    replayer = Replayer({}, layout.kernel_version, calls.pool_names())
    divergence = replayer.feed(ops + calls.flush())
    assert divergence is not None, "a lost put went unnoticed"


def test_decode_file_orders_ops_and_host_calls_by_sequence(stream, layout, tmp_path):
    path = tmp_path / "el2trace.bin"
    path.write_bytes(stream)
    seqs = [c.seq for c in decode_file(path, layout)]
    assert seqs == sorted(seqs) and len(seqs) > 5000


def test_a_page_read_that_failed_gives_no_seen(stream, layout):
    records, _ = read_records(stream)
    get = layout.functions.index("hyp_get_page")
    i = next(i for i, r in enumerate(records) if r.type == PROBE and r.fn == get and r.kind == "e")
    r = records[i]
    failed = type(r)(r.type, r.kind, r.fn, r.vcpu, 1, r.seq, r.pc, r.payload)
    calls = Calls(layout)
    ops, _ = calls.feed([*records[:i], failed, records[i + 1]])
    assert ops[-1].op == "get" and ops[-1].seen is None
    assert struct.unpack_from("<Q", r.payload)[0] != 0
