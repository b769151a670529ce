"""The bounded mutation fuzz (tests/fuzz.py) in the suite: seeded, under 60 s, every outcome a load or LmlabError."""
import fuzz


def test_readers_survive_mutations(tmp_path):
    report = fuzz.fuzz(seconds=30, seed=1, work=tmp_path)
    assert sum(report.counts.values()) > 100, report.counts  # the fuzz really ran cases
    assert not report.failures, "\n".join(report.failures[:10])


def test_fuzz_reports_a_reader_that_raises_the_wrong_type(tmp_path, monkeypatch):
    """The harness itself: an exception other than LmlabError is a failure naming target and seed."""
    pool = fuzz.Pool(memory_limit=0)
    try:
        outcome, detail = pool.run("no-such-target", tmp_path / "x", timeout=60)
    finally:
        pool.close()
    assert outcome == "KeyError" and "no-such-target" in detail


def test_fuzz_reports_hang_and_crash_and_recovers(tmp_path):
    pool = fuzz.Pool(memory_limit=0)
    try:
        assert pool.run("hang", tmp_path, timeout=8)[0] == "timeout"
        assert pool.run("crash", tmp_path, timeout=15) == ("crash", "worker exit code 3")
        assert pool.run("no-such-target", tmp_path, timeout=15)[0] == "KeyError"  # a fresh worker answers
    finally:
        pool.close()
