"""Attention over block tables, in plain PyTorch (CPU and CUDA).

A step's tokens are laid out flat: every prefill chunk's tokens, then one token per decoding
sequence. Prefill chunks attend one sequence at a time (a chunk sees all earlier tokens of its
sequence and itself causally, in query tiles when long); decodes run as padded batches with a key mask."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend

# SDPA backends the engine's attention may use. Recent PyTorch tries cuDNN first on Hopper in half
# precision, and cuDNN builds an execution plan for every new (batch, query length, key length): some
# 30 ms of host time each, and a serving step meets a new shape at almost every step (a request joins or
# leaves, a context crosses a block, a prompt of a new length). The others take any shape as it comes.
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ENABLED = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
            SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
            SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled}


def step_backends():
    """BACKENDS less those the caller has turned off (for determinism, say); cuDNN alone if that is all
    the caller left on."""
    return [b for b in BACKENDS if _ENABLED[b]()] or [SDPBackend.CUDNN_ATTENTION]

# Score elements one prefill attention call may hold where SDPA takes its math path (on CUDA: a mask with
# grouped-query attention, or fp32), which builds the whole [heads, queries, keys] matrix: a 32K-token
# prefill would need 128 GiB. Such prefills run in query tiles under this bound (512 MiB of fp32 scores).
SCORE_LIMIT = 1 << 27
# Query rows per masked SDPA call where the kernel is fused (the CPU's). Masked, it computes every score
# and then drops those masked out; a tile leaves out the keys past its last query, so smaller tiles waste
# less: a 1,024-token chunk after 1,024 cached took 23 ms in tiles of 256 against 28 in one call.
QUERY_TILE = 256


def kernel_is_fused(q, masked):
    """Whether SDPA takes its flash kernel, which streams over keys, for 4-D inputs like q: on the CPU
    in every case; on CUDA in half precision without a mask (is_causal instead), for head sizes that are
    a multiple of 8 up to 256, on sm80 or later. Never where the caller turned flash off: SDPA's other
    fused kernel takes no grouped-query attention, so the math path would build the whole matrix."""
    if not torch.backends.cuda.flash_sdp_enabled():  # the switch covers the CPU's flash kernel too
        return False
    if q.device.type != "cuda":
        return True
    head_dim = q.shape[-1]
    return (not masked and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def flash_lower_right(qs, k, v, scale):
    """Attention of the queries at the end of the keys, each seeing the keys up to its own position, in
    CUDA's flash kernel; None where flash cannot take these inputs. Flash aligns its causal mask to the
    last key (lower right) where the queries are fewer, SDPA's is_causal to the first (upper left): this
    calls the kernel as SDPA's own causal_lower_right bias does, without that bias, a Tensor subclass that
    allocates an unused [2, queries, keys] buffer and cannot be made under the activation profile's
    dispatch mode."""
    if (qs.device.type != "cuda" or not kernel_is_fused(qs, masked=False)  # the op itself pads no head size
            or not can_use_flash_attention(SDPAParams(qs, k, v, None, 0.0, False, True), False)):
        return None
    return torch.ops.aten._scaled_dot_product_flash_attention(qs, k, v, 0.0, True, False, scale=scale)[0]


@dataclass
class StepLayout:
    """Where each sequence's tokens sit in the flat step and which KV blocks it reads."""
    prefills: list  # (first token index, number of tokens, context length, block_rows of its table)
    decodes: list  # (first token index, block_rows of tables [batch, blocks] padded with block 0, key mask)
    slots: torch.Tensor  # flat KV slot of every token: block * block_size + offset


def is_decode(seq, num_tokens):
    """One query token after cached context: runs in the batched decode path (also a prefill's last 1-token chunk)."""
    return num_tokens == 1 and seq.num_computed > 0


def block_rows(table):
    """A block table's K and V rows [2, blocks] in a layer's cache viewed as one row per block half (row
    2b: block b's K, 2b + 1: its V). A gather of contiguous rows copies them whole (index_select), three
    times faster on the CPU than indexing the 5-D cache, which copies element by element."""
    return torch.stack((2 * table, 2 * table + 1))


def build_layout(chunks, block_size, gather_limit, device):
    """chunks: (sequence, number of new tokens), with every is_decode chunk after the others. Decodes
    run in groups that copy at most gather_limit K/V tokens out of the cache at once, so attention's
    memory stays within what a single max-length prefill needs (the activation profile's worst case)."""
    prefills, slots, decodes = [], [], []
    start = 0
    for seq, n in chunks:
        table = seq.block_table
        # Python lists, one tensor at the end: a decode's slot is cheaper computed than a tensor made.
        slots.extend(table[p // block_size] * block_size + p % block_size
                     for p in range(seq.num_computed, seq.num_computed + n))
        ctx = seq.num_computed + n
        if is_decode(seq, n):
            decodes.append((table, ctx))
        else:
            if decodes:
                raise ValueError("prefill chunks must come before decodes in a step")
            prefills.append((start, n, ctx, block_rows(torch.tensor(table, dtype=torch.long, device=device))))
        start += n
    groups = []
    first = start - len(decodes)
    while decodes:
        width = max(len(t) for t, _ in decodes)
        size = max(1, gather_limit // (width * block_size))
        group, decodes = decodes[:size], decodes[size:]
        tables = torch.tensor([t + [0] * (width - len(t)) for t, _ in group], dtype=torch.long, device=device)
        contexts = torch.tensor([ctx for _, ctx in group], device=device)
        mask = (torch.arange(width * block_size, device=device) < contexts[:, None]).view(len(group), 1, 1, -1)
        groups.append((first, block_rows(tables.flatten()), mask))
        first += len(group)
    return StepLayout(prefills, groups, torch.tensor(slots, dtype=torch.long, device=device))


def paged_attention(q, cache, layout, scale):
    """q [tokens, heads, head_dim]; cache the layer's KV view [blocks, 2, block_size, kv_heads, head_dim].
    Returns [tokens, heads, head_dim]."""
    out = torch.empty_like(q)
    halves = cache.view(-1, math.prod(cache.shape[2:]))  # see block_rows
    slot_shape = cache.shape[-2:]  # [kv_heads, head_dim]
    # Inputs are 4-D, [1, heads, tokens, head_dim]: SDPA's fused kernels take no other shape and would
    # leave 3-D inputs to the math path (ten times slower for a 2K-token prompt on the CPU).
    for start, n, ctx, kv_rows in layout.prefills:
        k, v = (halves.index_select(0, r).view(-1, *slot_shape)[:ctx].transpose(0, 1)[None]
                for r in kv_rows)  # [1, kv_heads, ctx, head_dim]
        qs = q[start:start + n].transpose(0, 1)[None]
        if n == ctx and kernel_is_fused(q, masked=False):  # a whole prompt: causal from its first key
            out[start:start + n] = F.scaled_dot_product_attention(
                qs, k, v, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
            continue
        o = flash_lower_right(qs, k, v, scale) if n < ctx else None  # a later chunk, on CUDA
        if o is not None:
            out[start:start + n] = o[0].transpose(0, 1)
            continue
        tile = QUERY_TILE if kernel_is_fused(q, masked=True) else max(1, SCORE_LIMIT // (q.shape[1] * ctx))
        for first in range(0, n, tile):  # query i sits at position ctx - n + i and sees keys up to it
            rows = min(tile, n - first)
            end = ctx - n + first + rows  # keys past the tile's last query are masked anyway: leave them out
            positions = torch.arange(end, device=q.device)
            mask = positions[None, :] <= positions[end - rows:, None]
            o = F.scaled_dot_product_attention(qs[:, :, first:first + rows], k[:, :, :end], v[:, :, :end],
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out[start + first:start + first + rows] = o[0].transpose(0, 1)
    for start, kv_rows, mask in layout.decodes:
        batch = mask.shape[0]
        k, v = (halves.index_select(0, r).view(batch, -1, *slot_shape).transpose(1, 2)
                for r in kv_rows)  # [batch, kv_heads, keys, head_dim]
        # The query heads that share a KV head become that head's queries (head h reads KV head h // group, as
        # in grouped-query attention): with a mask, grouped-query SDPA on CUDA takes the math path, which
        # copies K and V once per query head; this way a fused kernel takes it as it is.
        qs = q[start:start + batch].view(batch, k.shape[1], -1, q.shape[-1])  # [batch, kv_heads, group, head_dim]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[start:start + batch] = o.reshape(batch, *q.shape[1:])
    return out
