"""framing.readable: a framed console transcript as a person reads it."""

from __future__ import annotations

from harness.targets.framing import readable

TRANSCRIPT = (
    "pkvm-host# echo PKH79a9e8052446''-B; { ( /opt/pkvm-harness/bin/pkvm_guest --vms\r\n"
    "1 --vcpus 1 --pages 8\r\n> ) </dev/null 2>/tmp/.PKH79a9e8052446.err; }\r\n"
    "PKH79a9e8052446-B\r\n"
    "\x1evm=0 slot=0 touched=7 expected=7\r\n"
    "[   12.345678] kvm [1]: a kernel line\r\n"
    "\x1edone\r\n\r\n"
    "PKH79a9e8052446-S:0\r\n"
    "PKH79a9e8052446-E\r\n"
    "pkvm-host# echo PKH0000000000aa''-B; { ( false ) </dev/null; }\r\n"
    "PKH0000000000aa-B\r\n"
    "PKH0000000000aa-S:1\r\n"
    "\x1b[0mPKH0000000000aa-E\r\n"
)


def test_echoes_become_the_commands_and_markers_go():
    assert readable(TRANSCRIPT, ["/opt/pkvm-harness/bin/pkvm_guest --vms 1 --vcpus 1 --pages 8", "false"]) == [
        "$ /opt/pkvm-harness/bin/pkvm_guest --vms 1 --vcpus 1 --pages 8",
        "vm=0 slot=0 touched=7 expected=7",
        "[   12.345678] kvm [1]: a kernel line",
        "done",
        "$ false",
        "[exit 1]",
    ]


def test_an_echo_without_a_known_command_is_still_marked():
    assert readable(TRANSCRIPT, [])[0] == "$ (a command)"
