"""Print the table of mutants against the tests that caught them, and keep it in the runs dir."""

from __future__ import annotations

from harness.paths import default_runs_dir


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.mutants.test_mutants import RESULTS, write_table

    if RESULTS:
        table = write_table(default_runs_dir() / "mutants")
        terminalreporter.write_sep("=", "mutants and the tests that caught them")
        terminalreporter.write(table)
        terminalreporter.write_line(f"(also in {default_runs_dir() / 'mutants.md'} and mutants.json)")
