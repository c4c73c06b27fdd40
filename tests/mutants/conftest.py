"""Print the table of mutants against the tests that caught them, and keep it in the runs dir."""

from __future__ import annotations

from harness.kernel.debian import DEFAULT, SOURCES
from harness.paths import default_runs_dir


def pytest_addoption(parser):
    parser.addoption("--mutant-kernel", default=DEFAULT, choices=tuple(SOURCES),
                     help="the Debian kernel series the mutants are built on (default: %(default)s)")
    parser.addoption("--mutant-target", default="qemu", choices=("qemu", "ssh"),
                     help="qemu (default): the suites read EL2 over QMP; ssh: as on a board, each mutant "
                          "built with the EL2 dump and reached over SSH (--pkvm-target ssh://)")


def pytest_generate_tests(metafunc):
    if "mutant" in metafunc.fixturenames:
        from tests.mutants.mutants import catalogue

        mutants = catalogue(metafunc.config.getoption("--mutant-kernel"))
        metafunc.parametrize("mutant", mutants, ids=[m.name for m in mutants])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.mutants.test_mutants import RESULTS, write_table

    if RESULTS:
        suffix = "-ssh" if config.getoption("--mutant-target") == "ssh" else ""
        table = write_table(default_runs_dir() / f"mutants-{config.getoption('--mutant-kernel')}{suffix}")
        terminalreporter.write_sep("=", "mutants and the tests that caught them")
        terminalreporter.write(table)
        where = default_runs_dir() / f"mutants-{config.getoption('--mutant-kernel')}{suffix}"
        terminalreporter.write_line(f"(also in {where}.md and .json)")
