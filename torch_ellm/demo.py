"""python -m torch_ellm.demo: the elastic pool at work on the host backend, then SmolLM2-135M
generating on an ElasticCache next to transformers' DynamicCache.

--pool-only skips the model part (no transformers needed).
"""
import argparse
import time

import torch

from . import Pool, format_bytes

MiB = 1 << 20


def _row(step, pool, kv, act):
    s = pool.stats()
    return (f"{step:<34}{format_bytes(kv.mapped_bytes):>12}{format_bytes(act.mapped_bytes):>12}"
            f"{format_bytes(s['device_bytes']):>12}{format_bytes(s['borrowed_bytes']):>12}")


def pool_demo():
    """A KV tensor grows under a 64 MiB budget; a prefill's activations need room; the pool
    borrows the KV's cold prefix to host memory at the same address, then gives it back."""
    print("== Elastic pool (host backend): budget 64 MiB, host budget 32 MiB, 2 MiB chunks ==")
    pool = Pool("host", budget_bytes=64 * MiB, host_budget_bytes=32 * MiB, chunk_bytes=2 * MiB)
    kv = pool.virtual_tensor(256 * MiB, tag="kv")
    act = pool.virtual_tensor(64 * MiB, tag="activations")
    print(f"{'step':<34}{'kv mapped':>12}{'activations':>12}{'device':>12}{'borrowed':>12}")
    address = kv.data_ptr()
    for size in (8, 24, 48):
        kv.resize(size * MiB)
        print(_row(f"kv grows to {size} MiB", pool, kv, act))
    view = kv.as_tensor((48 * MiB // 4,), torch.int32)
    view.copy_(torch.arange(view.numel(), dtype=torch.int32))
    act.resize(40 * MiB)
    print(_row("prefill takes 40 MiB activations", pool, kv, act))
    act.resize(0)
    print(_row("prefill done", pool, kv, act))
    pool.return_borrowed()
    print(_row("borrowed kv returned", pool, kv, act))
    intact = bool((view == torch.arange(view.numel(), dtype=torch.int32)).all())
    print(f"kv address unchanged: {kv.data_ptr() == address}; kv bytes intact: {intact}")
    try:
        act.resize(64 * MiB)
    except torch.OutOfMemoryError as e:
        print(f"asking for more than both budgets raises torch.OutOfMemoryError:\n  {str(e)[:160]}...")
    del view
    kv.release()
    act.release()
    print(f"after release: device {format_bytes(pool.stats()['device_bytes'])}, "
          f"borrowed {format_bytes(pool.borrowed_bytes)}\n")


def _kv_bytes_dynamic(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def model_demo(model, tokenizer, prompt, new_tokens):
    from transformers import DynamicCache

    from .integrations.hf import ElasticCache, _cache_kwarg

    print("== SmolLM2-135M-Instruct on CPU: ElasticCache vs DynamicCache ==")
    inputs = tokenizer(prompt, return_tensors="pt")
    length = inputs.input_ids.shape[1] + new_tokens
    pool = Pool("host", budget_bytes=256 * MiB, chunk_bytes=4 << 10)
    caches = {"DynamicCache": DynamicCache(config=model.config),
              "ElasticCache": ElasticCache(model.config, max_cache_len=length, pool=pool)}
    texts = {}
    print(f"{'cache':<14}{'tokens/s':>10}{'kv bytes':>12}  text")
    for name, cache in caches.items():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **{_cache_kwarg(model): cache})
        seconds = time.perf_counter() - start
        texts[name] = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        kv = cache.mapped_bytes() if name == "ElasticCache" else _kv_bytes_dynamic(cache)
        print(f"{name:<14}{new_tokens / seconds:>10.1f}{format_bytes(kv):>12}  {texts[name]!r}")
    print(f"same text: {texts['DynamicCache'] == texts['ElasticCache']}")
    caches["ElasticCache"].release()


SYSTEM = ("You are a helpful assistant for a small museum of local history. Visitors ask short questions; "
          "answer each in one friendly sentence. ")
QUESTIONS = ["When does the museum open?", "Is there a cafe?", "Can I bring my dog?", "Where is the old mill?",
             "Are there guided tours?", "How much is a ticket?", "Is the museum accessible?", "Can I take photos?"]


def engine_demo(model, tokenizer):
    from .integrations.engine.llm import LLM
    from .integrations.engine.sampling_params import SamplingParams

    print(f"\n== Serving engine, elastic mode: {len(QUESTIONS)} requests sharing a system prompt, one 32 MiB pool ==")
    llm = LLM(model, tokenizer, mode="elastic", budget_bytes=32 * MiB, max_model_len=256, max_num_batched_tokens=64,
              chunk_bytes=64 << 10)
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                             tokenize=False, add_generation_prompt=True) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for question, out in list(zip(QUESTIONS, outs))[:3]:
        print(f"  {question!r} -> {out.text.strip()!r}")
    s = llm.metrics.summary()
    print(f"{s['output_tokens_per_s']:.1f} output tokens/s, max batch {s['max_batch']}, peak kv "
          f"{format_bytes(s['peak_kv_bytes'])}, prompt tokens found in the prefix cache: {s['cached_tokens']}")
    llm.close()
    print(f"after close: pool device bytes {format_bytes(llm.pool.stats()['mapped_device_bytes'])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pool-only", action="store_true")
    args = parser.parse_args(argv)
    pool_demo()
    if not args.pool_only:
        from .integrations.models import load_smollm2

        model, tokenizer = load_smollm2()
        model_demo(model, tokenizer, args.prompt, args.new_tokens)
        engine_demo(model, tokenizer)


if __name__ == "__main__":
    main()
