"""The report's plots as PNG bytes: perplexity against size, decode speed per configuration, memory.

Figures are drawn with matplotlib's object API on an Agg canvas, so nothing touches the global backend
(safe in a process that also shows plots). Each function takes the report's entries (see
:mod:`compress.eval.report`) and returns None when there is nothing to plot.
"""

from __future__ import annotations

import io

MB = 2**20


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def perplexity_vs_size(groups: list[tuple[str, list[dict]]]) -> bytes | None:
    """One series per protocol group: x the checkpoint (else in-memory) size, y the perplexity."""
    fig, ax = _figure()
    plotted = False
    for caption, entries in groups:
        points = [(e["size_bytes"] / MB, e["perplexity"], e["label"]) for e in entries
                  if e.get("perplexity") is not None and e.get("size_bytes")]
        if not points:
            continue
        xs, ys, labels = zip(*points)
        ax.scatter(xs, ys, label=caption if len(groups) > 1 else None)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        plotted = True
    if not plotted:
        return None
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity vs size")
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def decode_speed(entries: list[dict]) -> bytes | None:
    """Grouped bars: decode tok/s for each configuration and batch size, one bar per model."""
    timed = [(r["config"], r["batch"]) for e in entries for r in e["speed"] if "decode_tok_s" in r]
    cells = sorted(dict.fromkeys(timed), key=lambda c: c[1])  # by batch, configurations in run order
    models = [e for e in entries if any("decode_tok_s" in r for r in e["speed"])]
    if not cells or not models:
        return None
    fig, ax = _figure(max(6.4, 0.9 * len(cells) * len(models) / 2 + 2))
    width = 0.8 / len(models)
    for m, entry in enumerate(models):
        speed = {(r["config"], r["batch"]): r.get("decode_tok_s", 0.0) for r in entry["speed"]}
        ax.bar([i + m * width for i in range(len(cells))], [speed.get(c, 0.0) for c in cells], width,
               label=entry["label"])
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cells))])
    ax.set_xticklabels([f"{c}\nbatch {b}" for c, b in cells], fontsize=7)
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.set_title("Decode speed per configuration")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def memory(entries: list[dict]) -> bytes | None:
    """Stacked bars per model: weights in memory and the KV cache at the tested context."""
    rows = [e for e in entries if e.get("memory")]
    if not rows:
        return None
    fig, ax = _figure()
    labels = [e["label"] for e in rows]
    weights = [e["memory"]["tensor_bytes"] / MB for e in rows]
    kv = [e["memory"]["kv_cache_bytes_at_context"] / MB for e in rows]
    ax.bar(labels, weights, label="weights and buffers")
    ax.bar(labels, kv, bottom=weights, label="KV cache at the tested context")
    ax.set_ylabel("MiB")
    ax.set_title("Memory")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return _png(fig)
