"""The pictures the guide promises, as uint8 RGB arrays (`[H, W, 3]`).

Attention pictures are composed in numpy (exact pixel layout, so a test can read
them back); scatter plots use matplotlib's object API with the Agg canvas and
never touch pyplot, so no figure is registered globally and nothing can pile up
over a days-long run (the job `plt.close` does for pyplot figures). Everything
here runs on the logger's background thread.

`probe_report` turns the outputs of the jitted `metrics_fn` on the fixed probe
batch into pictures, consistency metrics and the embedding table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinocell_jax.monitor.consistency import channel_consistency

OVERLAY_ALPHA = 0.5  # weight of the attention colour over the grey input in the bottom row
ATTENTION_CMAP = "inferno"  # luminance rises monotonically with the value
PAD = 2  # pixels of white between panels
MIN_PANEL = 64  # small token grids are enlarged (nearest) to at least this many pixels
PLATE_KEYS = ("plate", "batch", "Metadata_Plate", "Metadata_Batch")


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _to_unit_range(x: np.ndarray, low_pct: float = 0.0, high_pct: float = 100.0) -> np.ndarray:
    """Per-panel rescale of `[N, ...]` to [0, 1] between the given percentiles."""
    x = np.nan_to_num(np.asarray(x, np.float64))
    axes = tuple(range(1, x.ndim))
    lo = np.percentile(x, low_pct, axis=axes, keepdims=True)
    hi = np.percentile(x, high_pct, axis=axes, keepdims=True)
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def upsample_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[N, h, w]` -> `[N, height, width]`, each output pixel takes the token it lies in."""
    _, h, w = maps.shape
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    return maps[:, rows][:, :, cols]


def _tile(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Panels `[h, w, 3]` float in [0, 1] (same size) -> one uint8 grid with PAD white borders."""
    h, w, _ = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    out = np.ones((PAD + len(rows) * (h + PAD), PAD + n_cols * (w + PAD), 3))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = PAD + r * (h + PAD), PAD + c * (w + PAD)
            out[y : y + h, x : x + w] = panel
    return np.round(out * 255).astype(np.uint8)


def _enlargement(h: int, w: int) -> int:
    return max(1, -(-MIN_PANEL // max(h, w)))


def _channel_mean_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim == 4:  # [P, H, W, C]: the guide's "channels averaged"
        images = images.mean(axis=-1)
    if images.ndim != 3:
        raise ValueError(f"attention_grid: images must be [P, H, W] (or [P, H, W, C]), got shape {images.shape}")
    return images


def attention_grid(images: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """The guide's attention picture.

    Args:
      images: `[P, H, W]` float (or `[P, H, W, C]`, averaged over C), the probe inputs.
      attention: `[P, h, w]` float, CLS-to-patch attention on the token grid.

    Returns:
      uint8 `[2S + 3*PAD, P*(S' + PAD) + PAD, 3]` with S x S' the panel size (H x W,
      enlarged by an integer factor when smaller than MIN_PANEL): top row the inputs
      (grey, 0.5-99.5 percentile stretch), bottom row each input with its attention
      (min-max per image, nearest-upsampled to the panel, `ATTENTION_CMAP`) blended
      at `OVERLAY_ALPHA`.
    """
    images = _channel_mean_images(images)
    attention = np.asarray(attention, np.float64)
    if attention.ndim != 3 or attention.shape[0] != images.shape[0]:
        raise ValueError(
            f"attention_grid: attention must be [P, h, w] with P={images.shape[0]}, got shape {attention.shape}"
        )
    scale = _enlargement(*images.shape[1:])
    images = upsample_nearest(images, images.shape[1] * scale, images.shape[2] * scale)
    _, height, width = images.shape
    grey = _to_unit_range(images, 0.5, 99.5)[..., None].repeat(3, axis=-1)
    heat = _colormap(ATTENTION_CMAP)(upsample_nearest(_to_unit_range(attention), height, width))[..., :3]
    overlay = (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * heat
    return _tile([list(grey), list(overlay)])


def attention_heads(attention: np.ndarray) -> np.ndarray:
    """Per-head attention maps: `[P, heads, h, w]` float -> uint8 grid, one row per probe
    image and one column per head, each map min-max scaled and enlarged to >= MIN_PANEL px."""
    attention = np.asarray(attention, np.float64)
    if attention.ndim != 4:
        raise ValueError(f"attention_heads: attention must be [P, heads, h, w], got shape {attention.shape}")
    n, heads, h, w = attention.shape
    scale = _enlargement(h, w)
    maps = upsample_nearest(_to_unit_range(attention.reshape(n * heads, h, w)), h * scale, w * scale)
    panels = _colormap(ATTENTION_CMAP)(maps)[..., :3].reshape(n, heads, h * scale, w * scale, 3)
    return _tile([list(row) for row in panels])


def _pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(projection [M, n_components], explained variance ratio), zero-padded when the
    data has fewer components (tiny probes, constant features)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"PCA: features of shape {x.shape} contain non-finite values")
    k = min(n_components, x.shape[0], x.shape[1])
    proj = np.zeros((x.shape[0], n_components))
    ratio = np.zeros(n_components)
    if k > 0 and x.shape[0] > 1:
        pca = PCA(n_components=k, svd_solver="full").fit(x)
        proj[:, :k] = pca.transform(x)
        ratio[:k] = np.nan_to_num(pca.explained_variance_ratio_)
    return proj, ratio


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return out


def pca_scatter(
    features: np.ndarray, color_by: Mapping[str, Sequence[str]], *, title: str = ""
) -> dict[str, np.ndarray]:
    """2D PCA scatter plots of one set of embeddings, one plot per colouring.

    Args:
      features: `[M, D]` float embeddings (fitted once, so all plots share the axes).
      color_by: name -> M category labels (e.g. "channel", "plate").
      title: prefix of each plot's title (e.g. the iteration).

    Returns:
      name -> uint8 `[H, W, 3]` image.
    """
    from matplotlib.figure import Figure

    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"pca_scatter: features must be [M, D], got shape {features.shape}")
    proj, ratio = _pca(features, 2)
    out = {}
    for name, labels in color_by.items():
        labels = [str(v) for v in labels]
        if len(labels) != features.shape[0]:
            raise ValueError(
                f"pca_scatter: color_by[{name!r}] has {len(labels)} labels for {features.shape[0]} features"
            )
        categories = list(dict.fromkeys(labels))
        colors = _colormap("tab10" if len(categories) <= 10 else "tab20")
        fig = Figure(figsize=(5, 4.2), dpi=100)
        ax = fig.add_subplot()
        for k, category in enumerate(categories):
            sel = np.array([v == category for v in labels])
            ax.scatter(proj[sel, 0], proj[sel, 1], s=14, alpha=0.8, color=colors(k % colors.N), label=category)
        if len(categories) <= 20:  # a legend of hundreds of plates is noise
            ax.legend(fontsize=7, markerscale=1.2, loc="best", title=name, title_fontsize=7)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}%)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}%)")
        ax.set_title(f"{title}PCA of {features.shape[0]} embeddings by {name}", fontsize=9)
        fig.tight_layout()
        out[name] = _render(fig)
    return out


def patch_pca_rgb(patch_features: np.ndarray) -> np.ndarray:
    """Patch features as colour: the 3 leading PCA components (fitted over all patches
    of all probe images) scaled to [0, 1] (1-99 percentiles) as R, G, B.

    Args:
      patch_features: `[P, h, w, D]` float.

    Returns:
      uint8 grid, one panel per probe image, enlarged (nearest) to >= MIN_PANEL px.
    """
    patch_features = np.asarray(patch_features)
    if patch_features.ndim != 4:
        raise ValueError(f"patch_pca_rgb: patch_features must be [P, h, w, D], got shape {patch_features.shape}")
    n, h, w, d = patch_features.shape
    proj, _ = _pca(patch_features.reshape(n * h * w, d), 3)
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1).reshape(n, h, w, 3)
    scale = _enlargement(h, w)
    rows, cols = np.arange(h * scale) // scale, np.arange(w * scale) // scale
    return _tile([list(rgb[:, rows][:, :, cols])])


def attention_entropy(attention: np.ndarray) -> float:
    """Mean entropy of the CLS-to-patch distributions, renormalised over the patches,
    divided by log(h*w): 1 = uniform, towards 0 = sharply focused. `[P, heads, h, w]`."""
    a = np.asarray(attention, np.float64).reshape(*np.shape(attention)[:2], -1)
    n = a.shape[-1]
    if n < 2:
        return 0.0
    p = np.clip(a, 0, None) / np.maximum(a.sum(-1, keepdims=True), 1e-30)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return float(np.mean(entropy) / np.log(n))


def _require(outputs: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(f"probe_report: metrics_fn outputs lack {missing} needed for {what} (have {sorted(outputs)})")


def probe_report(
    outputs: Mapping[str, np.ndarray],
    meta: Mapping[str, Sequence[Any]],
    step: int,
    *,
    attention: bool,
    pca: bool,
    channel_names: Sequence[str],
) -> tuple[dict[str, float], dict[str, np.ndarray], list[tuple[str, list[str], list[list[Any]]]]]:
    """Pictures, consistency metrics and the embedding table of one probe evaluation.

    Args:
      outputs: numpy values of `metrics_fn`: `images [P,H,W]`, `attention
        [P,heads,h,w]` (needed when `attention`); `cls [P,D]`, `patch [P,h,w,D]`,
        `channel_cls [P,C,D]`, `mean_cls [P,D]` (needed when `pca`).
      meta: per-field metadata, each a list of P values (e.g. plate, well, label);
        the plate colouring uses the first of `PLATE_KEYS` present.
      step: the iteration, shown in titles.
      attention / pca: which parts to make (the two intervals differ).
      channel_names: the C stain names of `channel_cls`.

    Returns:
      (scalars, images, tables). Scalars: `attention/entropy`, `consistency/*`.
      Images: `attention/maps`, `attention/heads`, `pca/by_channel`, `pca/by_plate`
      (when meta has a plate key), `pca/patch_rgb`. Tables: `[("pca/embeddings",
      columns, rows)]`, one row per embedding (P*C channel views + P channel means)
      with field index, view, the meta values and the embedding as a list of floats
      (what wandb's 2D projection panel reads).
    """
    scalars: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    tables: list[tuple[str, list[str], list[list[Any]]]] = []
    n_probe = next((np.shape(outputs[k])[0] for k in ("images", "cls") if k in outputs), None)
    for key, values in meta.items():
        if n_probe is not None and len(values) != n_probe:
            raise ValueError(f"probe_report: meta[{key!r}] has {len(values)} values for {n_probe} probe fields")
    if attention:
        _require(outputs, ("images", "attention"), "the attention pictures")
        att = np.asarray(outputs["attention"], np.float64)
        if att.ndim != 4:
            raise ValueError(f"probe_report: attention must be [P, heads, h, w], got shape {att.shape}")
        images["attention/maps"] = attention_grid(outputs["images"], att.mean(axis=1))
        images["attention/heads"] = attention_heads(att)
        scalars["attention/entropy"] = attention_entropy(att)
    if pca:
        _require(outputs, ("cls", "patch", "channel_cls", "mean_cls"), "the PCA pictures and channel consistency")
        channel_cls = np.asarray(outputs["channel_cls"], np.float64)
        cls = np.asarray(outputs["cls"], np.float64)
        scalars.update(channel_consistency(channel_cls, outputs["mean_cls"], channel_names))
        n_fields, n_channels, dim = channel_cls.shape
        features = np.concatenate([channel_cls.reshape(n_fields * n_channels, dim), cls])
        field = [p for p in range(n_fields) for _ in range(n_channels)] + list(range(n_fields))
        view = [str(channel_names[c]) for _ in range(n_fields) for c in range(n_channels)] + ["mean"] * n_fields
        color_by = {"channel": view}
        plate_key = next((k for k in PLATE_KEYS if k in meta), None)
        if plate_key is not None:
            color_by["plate"] = [str(meta[plate_key][p]) for p in field]
        for name, picture in pca_scatter(features, color_by, title=f"iteration {step}: ").items():
            images[f"pca/by_{name}"] = picture
        images["pca/patch_rgb"] = patch_pca_rgb(outputs["patch"])
        meta_keys = list(meta)
        columns = ["field", "view", *meta_keys, "embedding"]
        rows = [
            [field[r], view[r], *[_plain(meta[k][field[r]]) for k in meta_keys], features[r].astype(float).tolist()]
            for r in range(len(field))
        ]
        tables.append(("pca/embeddings", columns, rows))
    return scalars, images, tables


def _plain(v: Any) -> Any:
    """numpy scalars -> Python values (wandb tables and JSON take only those)."""
    return v.item() if isinstance(v, np.generic) else v
