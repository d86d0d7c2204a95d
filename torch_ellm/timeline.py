"""plot_timeline(): the balloon at work, drawn from a pool's event log."""
from .sizes import format_bytes

_MARKS = {"borrow": ("tab:red", "borrow"), "return": ("tab:green", "return"), "deflate": ("tab:purple", "deflate"),
          "oom": ("black", "out of memory")}


def plot_timeline(pool, path="timeline.png", title=None):
    """Draw device, host (borrowed chunks and host buffers) and per-tag bytes over time from pool.events() into a PNG.

    pool: a torch_ellm.Pool (or a list of event dicts). Borrow, return, deflate and OOM events are
    marked as vertical lines. Returns the path. Needs matplotlib (pip install matplotlib).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = pool if isinstance(pool, list) else pool.events()
    if not events:
        raise ValueError("no events to plot: the pool has not allocated anything yet")
    t = [e["t"] for e in events]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(t, [e["device_bytes"] for e in events], where="post", label="device", linewidth=2)
    ax.step(t, [e["host_bytes"] for e in events], where="post", label="host (borrowed, buffers)", linewidth=2)
    for tag in events[0]["tag_bytes"]:
        series = [e["tag_bytes"][tag] for e in events]
        if any(series):
            ax.step(t, series, where="post", label=f"tag {tag}", linestyle="--")
    seen = set()
    for e in events:
        if e["kind"] in _MARKS:
            color, label = _MARKS[e["kind"]]
            ax.axvline(e["t"], color=color, alpha=0.3, label=None if label in seen else label)
            seen.add(label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("bytes")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: format_bytes(v)))
    ax.set_title(title or "torch_ellm pool timeline")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
