"""lmlab.inference.kernels: kernels chosen by measurement, cached per machine, never trusted when stale."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from lmlab.inference import kernels
from lmlab.inference.kernels import RowLinear
from lmlab.inference.load import RunConfig, prepare
from lmlab.utils import device as device_utils
from test_generation import margin_model

CACHE_DIR = kernels.cache_dir  # the real one: $LMLAB_HOME/kernels
SHAPES = 5  # distinct weight shapes of tiny-llama: q/o, k/v, gate/up, down, lm_head
KINDS = len(kernels.candidates(torch.float32))  # row kinds timed per shape: 1, few, and prompt where packed exists


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh $LMLAB_HOME holding the cache (conftest points it elsewhere for other tests), no LMLAB_KERNELS,
    and notices that may repeat (they print once per message)."""
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "cache_dir", CACHE_DIR)
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(device_utils, "NOTES", [])
    return tmp_path


@pytest.fixture
def measured(monkeypatch):
    """Counts kernels.measure calls (one per weight shape and row kind), timings unchanged."""
    calls = []
    real = kernels.measure

    def counting(weight, rows, names):
        calls.append((tuple(weight.shape), rows))
        return real(weight, rows, names)

    monkeypatch.setattr(kernels, "measure", counting)
    return calls


def prepared(dtype="float32"):
    return prepare(margin_model("tiny-llama"), RunConfig(dtype=dtype, threads=1))


def cache_file(home):
    (path,) = (home / "kernels").glob("*.json")
    return path


def test_cache_is_written_then_hit(home, measured):
    first = prepared()
    assert len(measured) == KINDS * SHAPES and first.kernels.source == "measured"
    path = cache_file(home)
    assert str(path) == first.kernels.path and path.name.startswith("float32-1t-")
    data = json.loads(path.read_text())
    assert data["torch"] == torch.__version__ and data["threads"] == 1 and len(data["shapes"]) == SHAPES
    measured.clear()
    second = prepared()
    assert measured == [] and second.kernels.source == "cache hit" and all(second.kernels.cached.values())
    assert second.kernels.chosen == first.kernels.chosen
    assert "cache hit" in second.kernels.summary() and "from" in second.kernels.table()
    prepare(margin_model("tiny-llama"), RunConfig(dtype="bfloat16", threads=1))  # another dtype: another file
    assert len(list((home / "kernels").glob("*.json"))) == 2


def _corrupt(data):
    return "{not json"


def _other_torch(data):
    return json.dumps({**data, "torch": "1.0.0"})


def _other_machine(data):
    return json.dumps({**data, "fingerprint": {**data["fingerprint"], "flags": "0" * 16}})


def _other_schema(data):
    return json.dumps({**data, "schema": 0})


def _shape_missing(data):
    shapes = dict(data["shapes"])
    shapes.pop("64x64")
    return json.dumps({**data, "shapes": shapes})


def _bad_timing(data):
    shapes = json.loads(json.dumps(data["shapes"]))
    shapes["64x64"]["1"]["mv"] = -1
    return json.dumps({**data, "shapes": shapes})


@pytest.mark.parametrize("tamper, remeasured, why", [
    (_corrupt, KINDS * SHAPES, "not valid JSON"), (_other_torch, KINDS * SHAPES, "different torch"),
    (_other_machine, KINDS * SHAPES, "different fingerprint"), (_other_schema, KINDS * SHAPES, "different schema"),
    (_shape_missing, KINDS, None), (_bad_timing, KINDS, None)])
def test_untrusted_cache_is_remeasured_and_rewritten(home, measured, capsys, tamper, remeasured, why):
    prepared()
    path = cache_file(home)
    path.write_text(tamper(json.loads(path.read_text())))
    measured.clear()
    runner = prepared()
    assert len(measured) == remeasured
    if why:
        assert runner.kernels.source == f"re-measured ({why})"
        assert f"kernel cache: re-measured ({why}" in capsys.readouterr().err
    else:
        assert measured[0][0] == (64, 64) and runner.kernels.source == "cache hit + measured 1 new shape(s)"
    measured.clear()
    assert prepared().kernels.source == "cache hit" and measured == []  # the rewritten file is whole again


def test_timings_of_other_native_kernels_are_remeasured(home, measured, monkeypatch):
    """Timings measured with another version of lmlab's own kernels are stale: a changed source re-measures."""
    from lmlab.inference import native

    prepared()
    monkeypatch.setattr(native, "source_hash", lambda: "0" * 16)
    measured.clear()
    runner = prepared()
    assert len(measured) == KINDS * SHAPES and runner.kernels.source == "measured"  # into a file of its own


def test_environment_overrides(home, measured, monkeypatch):
    prepared()
    monkeypatch.setenv(kernels.ENV, "remeasure")
    measured.clear()
    assert prepared().kernels.source.startswith("re-measured") and len(measured) == KINDS * SHAPES
    monkeypatch.setenv(kernels.ENV, "off")
    measured.clear()
    runner = prepared()
    assert measured == [] and runner.kernels.source == "off"
    assert all(m.one_row == m.few_rows == "linear" for m in runner.model.modules() if isinstance(m, RowLinear))
    monkeypatch.setenv(kernels.ENV, "nocache")
    cache_file(home).unlink()
    assert prepared().kernels.path is None and not list((home / "kernels").glob("*.json"))


def test_an_unwritable_cache_is_a_notice(home, capsys):
    (home / "kernels").write_text("a file where the folder should be")
    runner = prepared()
    assert runner.kernels.path is None and "kernel cache: not saved" in capsys.readouterr().err


def _logits(runner, prompt):
    """Logits of a 5-token prompt (few rows), a 1-token step, a 4-token verification pass, and of a fresh
    prompt longer than FEW_ROWS (a prompt pass)."""
    cache = runner.new_cache(1, 16)
    ids = torch.tensor([prompt])
    out = torch.cat([runner.prefill(ids[:, :5], cache),
                     runner.step(ids[:, 5:6], cache), runner.logits_all(ids[:, 6:10], cache)[0]])
    long = torch.tensor([(prompt * 3)[: kernels.FEW_ROWS + 4]])
    return torch.cat([out, runner.prefill(long, runner.new_cache(1, long.shape[1]))])


def test_every_route_gives_the_same_float32_logits(measured):
    prompt = [5, 17, 3, 42, 9, 11, 30, 2, 8, 19]
    runner = prepared()
    kernels.choose(runner.model, force={"1": "linear", "few": "linear"})
    want = _logits(runner, prompt)
    names = kernels.candidates(torch.float32)
    assert "packed" in names["1"] or not kernels.packed_available(torch.float32)
    for one, few, many in itertools.product(names["1"], names["few"], names.get("prompt", ("linear",))):
        choice = kernels.choose(runner.model, force={"1": one, "few": few, "prompt": many})
        assert set(choice.chosen["64x64"].values()) == {one, few, many} and choice.source == "forced"
        torch.testing.assert_close(_logits(runner, prompt), want, atol=1e-5, rtol=1e-5, msg=f"{one}/{few}/{many}")
    kernels.choose(runner.model, force={"64x64": {"1": "mv", "few": "W@xT"}, "1": "linear", "few": "linear"})
    lins = [m for m in runner.model.modules() if isinstance(m, RowLinear)]
    assert {(m.one_row, m.few_rows) for m in lins if m.weight.shape == (64, 64)} == {("mv", "W@xT")}
    assert {(m.one_row, m.few_rows) for m in lins if m.weight.shape != (64, 64)} == {("linear", "linear")}
    assert len(measured) == KINDS * SHAPES  # only the first prepare measured: forcing measures nothing


@pytest.mark.parametrize("route", ["packed", "native"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_and_native_routes_match_linear(route, dtype, tol):
    available = kernels.packed_available if route == "packed" else kernels.native_available
    if not available(dtype):
        pytest.skip(f"no {route} kernel for {dtype} here")
    torch.manual_seed(0)
    lin = RowLinear.sharing(torch.nn.Linear(96, 80)).to(dtype)
    lin.set_route(route, route, prompt_rows="packed" if route == "packed" else None)
    assert route != "packed" or (lin.packed is not None and lin.packed.dtype == dtype)
    with torch.inference_mode():
        for rows in (1, 3, 16, 40):
            x = torch.randn(rows, 96).to(dtype)
            want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            got = lin(x)
            assert got.dtype == dtype and got.shape == want.shape
            assert ((got.float() - want).norm() / want.norm()).item() < tol, rows
    x = torch.randn(1, 96, dtype=dtype, requires_grad=True)  # under autograd both routes take F.linear
    lin(x).sum().backward()
    assert x.grad is not None


def test_a_compiled_packed_layer_runs_its_fastest_unpacked_kernel(monkeypatch):
    """torch.compile cannot trace the packed op: the layer takes the kernel measured fastest after it."""
    if not kernels.packed_available(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")
    lin = RowLinear.sharing(torch.nn.Linear(64, 48))
    lin.set_route("packed", "packed", unpacked=("mv", "W@xT"))
    used = []
    monkeypatch.setattr(torch, "mv", lambda w, x: used.append("mv") or F.linear(x, w))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        x = torch.randn(1, 64)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert used == ["mv"]


def test_packing_keeps_parameters_tied_and_the_state_dict_plain():
    runner = prepared()
    model = runner.model
    keys = {k: v.shape for k, v in model.state_dict().items()}
    if kernels.packed_available(torch.float32):
        kernels.choose(model, force={"1": "packed", "few": "packed"})
        assert model.lm_head.packed is not None
    assert model.lm_head.weight is model.tok_emb.weight
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    with torch.inference_mode():
        want = model(torch.tensor([[1, 2, 3]]))
    model.to(torch.float32)  # .to()/.float() drop the packed copies: the layers fall back to F.linear
    assert all(m.packed is None for m in model.modules() if isinstance(m, RowLinear))
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.tensor([[1, 2, 3]])), want, atol=1e-5, rtol=1e-5)


def test_quantized_layers_report_their_kernels(measured):
    runner = prepare(margin_model("tiny-llama"), RunConfig(quantize="int8", threads=1))
    assert measured == []  # quantized layers choose for themselves
    q = runner.kernels.quantized
    assert "512x64 int8" in q and set(q["512x64 int8"]) == {"1", "few", "prompt"}
    assert q["512x64 int8"]["1"] in ("native int8", "int8pack", "dequant+linear")
    assert "512x64 int8" in runner.kernels.summary() and "prompt passes" in runner.kernels.table()


def test_cli_info_kernels_and_generate_stats(home, tmp_path, capsys):
    from lmlab.cli import main
    from tiny_gguf import write_tiny

    tiny = tmp_path / "tiny.gguf"
    write_tiny(tiny)

    def run(*args):
        with pytest.raises(SystemExit) as ended:
            main(list(args))
        out = capsys.readouterr()
        assert ended.value.code in (0, None), out.err
        return out

    out = run("info", "-m", str(tiny), "--kernels", "--threads", "1")
    assert "kernels for float32, 1 threads: measured" in out.out and "chosen" in out.out
    assert "linear ms" in out.out and "cache file:" in out.out and "decoder (llama)" in out.out
    out = run("info", "-m", str(tiny), "--kernels", "--threads", "1")
    assert "kernels for float32, 1 threads: cache hit" in out.out
    out = run("generate", "-m", str(tiny), "-p", "The quick", "--max-new-tokens", "3", "--temperature", "0",
              "--threads", "1", "--stats")
    assert "kernels (1 row/4 rows/prompt):" in out.err and "cache hit" in out.err


def prepared_with(monkeypatch, fake, free=None):
    """prepared() with these timings (rows → kernel → ms) measured, and this much free memory; (runner, its
    RowLinears)."""
    monkeypatch.setattr(kernels, "measure", lambda w, rows, names: {n: fake[rows][n] for n in names})
    if free is not None:
        monkeypatch.setattr(kernels, "free_memory", lambda device: free)
    runner = prepared()
    return runner, [m for m in runner.model.modules() if isinstance(m, RowLinear)]


def test_a_kernel_replaces_linear_only_by_the_margin(monkeypatch):
    assert kernels.pick({"linear": 1.0, "mv": 0.95}) == "linear"  # 5% faster: noise, keep linear
    assert kernels.pick({"linear": 1.0, "mv": 0.8, "packed": 0.85}) == "mv"
    assert kernels.pick({"linear": 0.5, "W@xT": 0.1, "packed": 0.2}) == "W@xT"
    fake = {1: {"linear": 1.0, "mv": 1.5, "packed": 1.4, "native": 1.2},
            kernels.FEW: {"linear": 2.0, "W@xT": 1.0, "packed": 3.0, "native": 1.5},
            kernels.PROMPT: {"linear": 5.0, "packed": 4.8}}
    runner, lins = prepared_with(monkeypatch, fake)
    assert {(m.one_row, m.few_rows, m.prompt_rows) for m in lins} == {("linear", "W@xT", "linear")}
    assert all(m.packed is None for m in lins)


def test_packing_is_skipped_when_memory_is_short(monkeypatch, capsys):
    if not kernels.packed_available(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")
    fake = {1: {"linear": 2.0, "mv": 1.9, "packed": 1.0, "native": 1.9},
            kernels.FEW: {"linear": 2.0, "W@xT": 1.0, "packed": 0.5, "native": 1.9},
            kernels.PROMPT: {"linear": 5.0, "packed": 2.0}}
    runner, lins = prepared_with(monkeypatch, fake)
    assert {(m.one_row, m.few_rows, m.prompt_rows) for m in lins} == {("packed", "packed", "packed")}
    assert runner.kernels.packed_bytes > 0
    assert {m.unpacked for m in lins} == {("linear", "W@xT")}  # what a compiled step runs instead of packed
    runner, lins = prepared_with(monkeypatch, fake, free=1000)
    assert {(m.one_row, m.few_rows, m.prompt_rows) for m in lins} == {("linear", "W@xT", "linear")}
    assert runner.kernels.packed_bytes == 0
    assert "packing skipped" in runner.kernels.source and "packing skipped" in capsys.readouterr().err


def test_prompt_passes_give_up_their_packed_copies_first(monkeypatch, capsys):
    """Short of memory, the copies only prompt passes want go first; decoding keeps its kernels."""
    if not kernels.packed_available(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")
    fake = {1: {"linear": 2.0, "mv": 1.0, "packed": 1.5, "native": 1.9},
            kernels.FEW: {"linear": 2.0, "W@xT": 1.0, "packed": 1.5, "native": 1.9},
            kernels.PROMPT: {"linear": 5.0, "packed": 2.0}}
    runner, lins = prepared_with(monkeypatch, fake, free=1000)
    assert {(m.one_row, m.few_rows, m.prompt_rows) for m in lins} == {("mv", "W@xT", "linear")}
    assert runner.kernels.packed_bytes == 0 and "prompt passes unpacked" in runner.kernels.source
    assert "prompt passes unpacked" in capsys.readouterr().err


def test_a_candidate_that_disagrees_with_linear_is_never_chosen(monkeypatch):
    """measure() checks every candidate against F.linear before timing it; a wrong one gets an infinite time."""
    monkeypatch.setattr(kernels, "native_linear", lambda x, w: F.linear(x, w) * 1.01)  # 1% off: a real bug
    w = torch.randn(64, 32)
    t = kernels.measure(w, 1, ("linear", "mv", "native"))
    assert t["native"] == float("inf") and t["mv"] < float("inf") and t["linear"] < float("inf")
    assert kernels.pick(t) != "native"
    t = kernels.measure(w, kernels.FEW, ("linear", "W@xT", "native"))
    assert t["native"] == float("inf") and t["W@xT"] < float("inf")
    monkeypatch.setattr(kernels, "native_linear", lambda x, w: F.linear(x, w))
    assert kernels.measure(w, 1, ("linear", "native"))["native"] < float("inf")
