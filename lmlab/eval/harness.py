"""Bridge to lm-evaluation-harness: an `lm_eval` model class backed by an lmlab model.

Any harness task (its own YAML or a local one) then runs on lmlab models, scored by lmlab's engine
(grouped contexts with KV reuse, logits only where scored, batch-size-invariant scores):

    import lmlab.eval.harness                      # registers the model name "lmlab"
    from lm_eval import simple_evaluate
    simple_evaluate(model="lmlab", model_args="pretrained=smollm2-135m,batch_size=32", tasks=[...])

    from lmlab.eval.harness import LmlabLM
    simple_evaluate(model=LmlabLM(model=model, tokenizer=tok), tasks=[...])

From the command line: `lm_eval --model lmlab --model_args pretrained=smollm2-135m --include_path
DIR --tasks NAME` needs the registration first, e.g. `python -m lmlab.eval.harness --model_args ...`,
which registers "lmlab" and then hands the rest of the command line to lm_eval's own CLI.

lm_eval is a dev extra, not a dependency of lmlab: importing this module without it raises LmlabError.
Requests are answered in one engine call per request type; under torchrun the engine itself splits
them over the processes and gathers the answers on every rank, so lm_eval sees one process per rank
(as with its tensor-parallel launchers) and only LOCAL_RANK 0 writes results.
"""
from __future__ import annotations

import sys
from typing import Any

from lmlab.errors import LmlabError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LmlabError("the lm-evaluation-harness bridge needs the lm_eval package, which is not installed "
                     "(pip install 'lm_eval==0.4.13', or lmlab's dev extra)") from None

from lmlab.eval.engine import Engine
from lmlab.eval.requests import GenerateUntil, Loglikelihood, LoglikelihoodRolling

_GEN_SETTINGS = ("temperature", "top_k", "top_p", "seed")


def _batch_size(value: Any) -> int:
    """lm_eval passes batch sizes as ints or strings ('16', 'auto', 'auto:4'); 'auto' means our default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 32
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LmlabError(f"lmlab bridge: batch_size={value!r} is not an integer or 'auto'") from None


def _optional_int(name: str, value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LmlabError(f"lmlab bridge: {name}={value!r} is not an integer") from None


class LmlabLM(LM):
    """An lm_eval `LM` scoring with lmlab's engine.

    Give either `pretrained` (any spec `lmlab.checkpoints.load` accepts: a preset name, a .gguf file, an
    HF folder or an lmlab checkpoint) or an already loaded `model` and `tokenizer`. `max_length` is the
    context window (default: the model's), `rolling_stride` the new tokens per window for
    loglikelihood_rolling (default: the window, i.e. disjoint windows as lm_eval's own models use).
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: Any = 32,
                 max_length: Any = None, rolling_stride: Any = None, dtype: str = "float32",
                 device: str | None = None, progress: Any = True, max_batch_size: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise LmlabError(f"lmlab bridge: unknown model argument(s) {', '.join(sorted(unknown))} (known: "
                             "pretrained, batch_size, max_length, rolling_stride, dtype, device, progress)")
        if device and str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():  # lm_eval's command line asks for cuda:0 unless told otherwise
                print(f"lmlab bridge: device {device} is not available; using cpu", file=sys.stderr)
                device = "cpu"
        if model is None:
            if not pretrained:
                raise LmlabError("lmlab bridge: give pretrained=<model spec> (e.g. smollm2-135m) "
                                 "or model= and tokenizer=")
            from lmlab.checkpoints import load

            model, tokenizer = load(str(pretrained), dtype=dtype, device=device or "cpu")
            if tokenizer is None:
                raise LmlabError(f"{pretrained}: no tokenizer found with this model")
        elif tokenizer is None:
            raise LmlabError("lmlab bridge: model= needs tokenizer= too")
        if isinstance(progress, str):
            progress = progress.lower() not in ("0", "false", "no")
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, batch_size=_batch_size(batch_size),
                             max_length=_optional_int("max_length", max_length), progress=bool(progress))
        self.rolling_stride = _optional_int("rolling_stride", rolling_stride)
        self._device = self.engine.device

    # -------------------------------------------------------------- facts lm_eval asks about
    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.model.cfg, "name", "") or "lmlab")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # -------------------------------------------------------------- the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        asked = [Loglikelihood(*req.args) for req in requests]
        answers = self.engine.loglikelihood(asked, desc="lm_eval loglikelihood")
        out = [(a.logprob, a.is_greedy) for a in answers]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        asked = [LoglikelihoodRolling(req.args[0]) for req in requests]
        answers = self.engine.loglikelihood_rolling(asked, window=self.engine.max_length, stride=self.rolling_stride,
                                                    desc="lm_eval loglikelihood_rolling")
        out = [a.logprob for a in answers]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        asked = [self._generation_request(*req.args[:2]) for req in requests]
        out = self.engine.generate_until(asked, desc="lm_eval generate_until")
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, res)
        return out

    def _generation_request(self, context: str, gen_kwargs: dict | None) -> GenerateUntil:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if until is None:  # lm_eval's default: stop at end of text
            eos = self.tokenizer.eos_id
            until = [self.tokenizer.decode([eos], skip_special_tokens=False)] if eos is not None else []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.pop("max_gen_toks", 256))
        settings = {k: kw[k] for k in _GEN_SETTINGS if k in kw and kw[k] is not None}
        if not kw.get("do_sample", False):
            settings["temperature"] = 0.0
        return GenerateUntil(context, tuple(until), max_gen, tuple(sorted(settings.items())))


try:
    register_model("lmlab")(LmlabLM)
except ValueError:  # this module was imported again (e.g. reloaded): the name keeps its first class
    pass


def main(argv: list[str] | None = None) -> None:
    """`python -m lmlab.eval.harness ARGS`: lm_eval's CLI with the "lmlab" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if "--model" not in sys.argv:
        sys.argv += ["--model", "lmlab"]
    cli_evaluate()


if __name__ == "__main__":
    main()
