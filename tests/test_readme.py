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
