"""The bounded mutation fuzz (tests/fuzz.py) in the suite: seeded, under 60 s, every outcome a load or LmlabError."""
import fuzz

# cases the fuzz once found (target, seed): each must stay a load or an LmlabError
FOUND = [("lmlab.json", 7005999),  # rope_theta an integer beyond float range: OverflowError in the rotary table
         ("gguf", 495),  # merges naming tokens outside the vocabulary: a bare Exception from tokenizers
         ("lmlab.json", 11003216),  # a key holding a newline made a two-line message
         ("task-mc.yaml", 2712),  # data_files a number: TypeError in the file lookup
         ("task-gen.yaml", 2905),  # a filter's regex_pattern a mapping: TypeError inside re
         ("task-gen.yaml", 2819),  # fewshot_config.sampler a list: TypeError in the sampler registry
         ("task-mc.yaml", 332),  # an unknown output_type holding a newline made a two-line message
         ("task-mc.yaml", 14187)]  # a target rendering to NaN: ValueError from int() (the 10-minute run)


def test_readers_survive_mutations(tmp_path):
    report = fuzz.fuzz(seconds=25, seed=1, work=tmp_path, replay=FOUND)
    assert sum(report.counts.values()) > 100, report.counts  # the fuzz really ran cases
    assert not report.failures, "\n".join(report.failures[:10])


def test_harness_reports_wrong_exception_hang_and_crash(tmp_path):
    """An exception other than LmlabError, a hang and a crash are each a failure; a fresh worker follows."""
    pool = fuzz.Pool(memory_limit=0)
    try:
        outcome, detail = pool.run("no-such-target", tmp_path, timeout=60)
        assert outcome == "KeyError" and "no-such-target" in detail
        assert pool.run("hang", tmp_path, timeout=5)[0] == "timeout"
        assert pool.run("crash", tmp_path, timeout=60) == ("crash", "worker exit code 3")
    finally:
        pool.close()
