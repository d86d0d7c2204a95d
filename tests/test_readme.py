"""The README's CPU example must run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_pool_example_runs():
    block = next(b for b in python_blocks() if 'Pool(backend="host"' in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["pool"].stats()["device_bytes"] == 0
    assert namespace["kv"].released and namespace["act"].released


def run_block(marker, smollm2, monkeypatch):
    """Run the README's python block that contains marker, its load_smollm2() answered by the session's
    model (a copy of the tokenizer: the block may set its padding side); the block's namespace."""
    import copy
    from torch_ellm.integrations import models
    monkeypatch.setattr(models, "load_smollm2", lambda: (smollm2[0], copy.deepcopy(smollm2[1])))
    block = next(b for b in python_blocks() if marker in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_hf_cache_example_runs(smollm2, monkeypatch):
    ns = run_block("ElasticCache(model.config", smollm2, monkeypatch)
    assert ns["pool"].stats()["device_bytes"] == 0  # the wrapper's cache and the released one gave all back
    assert ns["cache"].mapped_bytes() == 0
    new = ns["ids"][:, ns["inputs"].input_ids.shape[1]:]
    assert new.shape == (2, 20)


def test_engine_example_runs(smollm2, monkeypatch):
    ns = run_block("llm.add_request(", smollm2, monkeypatch)
    assert "Paris" in ns["outs"][0].text  # what the README's comment says SmolLM2 answers
    assert ns["llm"].metrics.summary()["requests"] == 3
    assert ns["llm"].pool.stats()["device_bytes"] == 0  # close() gave every chunk back
