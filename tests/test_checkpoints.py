"""checkpoints.build: a model made on the meta device takes the given tensors as they are, and recomputes
what checkpoints do not store (position tables)."""
import pytest
import torch

from lmlab.checkpoints import build
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer

SMALL = dict(vocab_size=97, n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=64)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned"])
def test_build_takes_the_tensors_and_recomputes_position_tables(pos):
    torch.manual_seed(0)
    source = Transformer(ModelConfig(pos=pos, **SMALL)).eval()
    sd = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model = build(source.cfg, sd, "test").eval()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.tok_emb.weight.data_ptr() == sd["tok_emb.weight"].data_ptr()  # taken, not copied
    assert model.lm_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


def test_build_names_a_missing_tensor():
    source = Transformer(ModelConfig(**SMALL))
    sd = {k: v for k, v in source.state_dict().items() if k != "decoder.norm.weight"}
    with pytest.raises(LmlabError, match="missing tensors 'decoder.norm.weight'"):
        build(source.cfg, sd, "test")
