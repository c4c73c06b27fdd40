"""The hypervisor's trace remote as tracefs prints it (tests/golden/hyp-trace-7.3.txt: recorded
from a 7.3.4 debug kernel around one VM's life) parses into events."""

from pathlib import Path

from harness.targets.hyp_trace import HypEvent

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "hyp-trace-7.3.txt"


def test_every_recorded_line_parses_with_its_fields():
    lines = GOLDEN.read_text().splitlines()
    events = [HypEvent.parse(line) for line in lines]
    assert None not in events and len(events) == len(lines) > 20
    assert {e.name for e in events} == {"hyp_enter", "hyp_exit"}
    assert all(set(e.fields) == {"reason", "vcpu"} for e in events)
    guest = [e for e in events if e.fields["reason"] == "eret_guest"]
    assert guest and all(e.fields["vcpu"] != "0" for e in guest)


def test_one_line_exactly_and_what_is_not_an_event():
    e = HypEvent.parse("[001]\t    2.760948: hyp_exit reason=eret_guest vcpu=148")
    assert e == HypEvent(1, 2_760_948, "hyp_exit", {"reason": "eret_guest", "vcpu": "148"})
    assert HypEvent.parse("CPU:1 [LOST 12 EVENTS]") is None and HypEvent.parse("") is None
