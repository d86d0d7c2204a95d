"""The demo (README's first command) runs and shows what it claims: the pool keeps addresses and bytes,
ElasticCache gives DynamicCache's text, the engine serves from one pool and finds the shared prompt cached."""
import re

from torch_ellm import demo


def test_demo_shows_what_it_claims(smollm2, capsys):
    demo.pool_demo()
    demo.model_demo(*smollm2, "The capital of France is", 8)
    demo.engine_demo(*smollm2)
    out = capsys.readouterr().out
    assert "kv address unchanged: True; kv bytes intact: True" in out
    assert "after release: device 0 B, borrowed 0 B" in out
    assert "same text: True" in out
    assert int(re.search(r"found in the prefix cache: (\d+)", out).group(1)) > 0
    assert "after close: pool device bytes 0 B" in out
