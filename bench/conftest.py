"""Bench fixtures: the machine's read bandwidth (measured once per run) and a summary table printed at the end."""
import pytest

from bandwidth import BestBandwidth

_ROWS = []


@pytest.fixture(scope="session")
def read_bw():
    """A bandwidth.BestBandwidth: read_bw.measure() -> best bytes/s a STREAM-style read reached so far."""
    return BestBandwidth()


@pytest.fixture(scope="session")
def report():
    """report(line): add a line to the summary printed after pytest-benchmark's table."""
    return _ROWS.append


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.write_sep("-", "achieved bandwidth")
        for row in _ROWS:
            terminalreporter.write_line(row)
