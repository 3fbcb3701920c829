"""Small real datasets that work offline, for examples, tests and benchmarks.

- ``digits_loaders``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled
  to ``size`` x ``size`` and repeated to ``channels`` so torchvision models accept them.
  The test split is 20% (360 images: one image is 0.28 accuracy points).
- ``mnist1d_loaders``: the MNIST-1D benchmark, generated locally by ``mnist1d.make_dataset``
  (never downloaded): 4,000 train / 1,000 test sequences of length 40.
- ``glyphs_loaders``: a harder task generated here: up to 86 classes of characters drawn from
  the fonts matplotlib ships, under affine maps, clutter, blur, noise and colour jitter scaled
  by ``difficulty``; 64x64 RGB by default, cached on disk after the first generation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.io import atomic_torch_save, cache_dir, file_lock, safe_torch_load

#: a loader of (inputs, labels) batches
Loader = DataLoader[tuple[torch.Tensor, ...]]


def _split(n: int, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    n_test = int(round(n * test_share))
    return idx[n_test:], idx[:n_test]


def digits_tensors(
    size: int = 32, channels: int = 3, seed: int = 0, test_share: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    x = (x - 0.5) / 0.5
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = _split(len(y), test_share, seed)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def digits_loaders(
    size: int = 32, channels: int = 3, batch_size: int = 64, seed: int = 0
) -> tuple[Loader, Loader]:
    """(train, test) loaders of sklearn digits; the train loader shuffles with ``seed``."""
    train, test = digits_tensors(size=size, channels=channels, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=256, shuffle=False),
    )


def mnist1d_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    def conv(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1)  # N,1,40
    return (
        TensorDataset(conv(d["x"]), torch.tensor(d["y"], dtype=torch.long)),
        TensorDataset(conv(d["x_test"]), torch.tensor(d["y_test"], dtype=torch.long)),
    )


def mnist1d_loaders(batch_size: int = 64, seed: int = 0) -> tuple[Loader, Loader]:
    """(train, test) loaders of MNIST-1D, inputs shaped (N, 1, 40)."""
    train, test = mnist1d_tensors(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=256, shuffle=False),
    )


# --------------------------------------------------------------------------------------
# glyphs: a harder synthetic task rendered from the fonts matplotlib ships
# --------------------------------------------------------------------------------------

#: bump whenever the generated images change for the same arguments (invalidates the cache)
GLYPHS_VERSION = 1

#: the classes, in order; ``n_classes=k`` takes the first k. Lower-case letters that look
#: like their capitals after scaling (c o p s u v w x z) and l (like I) are left out.
GLYPH_CLASSES: tuple[str, ...] = tuple(
    "0123456789"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abdefghijkmnqrty"
    "#$%&@?!+=<>*\u00a7\u00b6\u20ac\u00a3\u00a5"          # § ¶ € £ ¥
    "\u03b1\u03b2\u03b3\u03b4\u03b8\u03bb\u03bc\u03c0\u03c3\u03c6\u03c9"  # α β γ δ θ λ μ π σ φ ω
    "\u0394\u03a3\u03a9\u03a6\u03a8\u039e"                          # Δ Σ Ω Φ Ψ Ξ
)

#: the font files (in matplotlib's mpl-data/fonts/ttf) glyphs are drawn with: DejaVu Sans,
#: Serif and Mono in four styles each, and STIX in four
GLYPH_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

#: named difficulty levels (``difficulty="hard"`` is ``difficulty=0.75``)
GLYPH_LEVELS: dict[str, float] = {"easy": 0.25, "medium": 0.5, "hard": 0.75, "extreme": 1.0}
#: the default difficulty, calibrated so a ResNet-18 trained from scratch lands at 80-95%
#: (BENCHMARKS.md, "Glyphs task: difficulty calibration")
GLYPHS_DEFAULT_DIFFICULTY = 0.35
_MIN_GLYPH_SIZE = 16
_GEN_BATCH = 1024


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _glyph_difficulty(difficulty: float | str) -> float:
    if isinstance(difficulty, str):
        if difficulty not in GLYPH_LEVELS:
            raise InvalidInputError(
                f"difficulty={difficulty!r} is not a level; use one of "
                f"{', '.join(GLYPH_LEVELS)} or a number in [0, 1]")
        return GLYPH_LEVELS[difficulty]
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)):
        raise InvalidInputError(
            f"difficulty={difficulty!r} must be a number in [0, 1] or one of "
            f"{', '.join(GLYPH_LEVELS)}")
    d = float(difficulty)
    if not 0.0 <= d <= 1.0:  # also rejects nan
        raise InvalidInputError(f"difficulty={difficulty!r} is out of range; use a number in [0, 1]")
    return d


def _check_count(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name}={value!r} must be an integer")
    v = int(value)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidInputError(f"{name}={value!r} is out of range; use an integer {rng}")
    return v


def _render_templates(size: int, n_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every (class, font) glyph drawn once, centred on a size x size canvas.

    Returns (templates [n_classes * n_fonts, 1, size, size] float in [0, 1], covered
    [n_classes, n_fonts] bool: the font has the character).
    """
    from matplotlib import ft2font
    from PIL import Image, ImageDraw, ImageFont

    font_dir = _font_dir()
    n_fonts = len(GLYPH_FONTS)
    out = np.zeros((n_classes, n_fonts, size, size), dtype=np.float32)
    covered = np.zeros((n_classes, n_fonts), dtype=bool)
    px = max(8, int(round(0.62 * size)))
    for f, name in enumerate(GLYPH_FONTS):
        path = font_dir / name
        if not path.is_file():
            raise InvalidInputError(
                f"font {path} is missing from this matplotlib install; reinstall matplotlib "
                "(the glyphs task draws with the fonts it ships)")
        charmap = ft2font.FT2Font(str(path)).get_charmap()
        font = ImageFont.truetype(str(path), px)
        for c in range(n_classes):
            ch = GLYPH_CLASSES[c]
            if ord(ch) not in charmap:
                continue
            x0, y0, x1, y1 = font.getbbox(ch)
            img = Image.new("L", (size, size), 0)
            ImageDraw.Draw(img).text((size / 2 - (x0 + x1) / 2, size / 2 - (y0 + y1) / 2),
                                     ch, font=font, fill=255)
            out[c, f] = np.asarray(img, dtype=np.float32) / 255.0
            covered[c, f] = True
    t = torch.from_numpy(out.reshape(n_classes * n_fonts, 1, size, size))
    return t, covered


def _affine_theta(rot: np.ndarray, scale: np.ndarray, aspect: np.ndarray, shear: np.ndarray,
                  tx: np.ndarray, ty: np.ndarray) -> torch.Tensor:
    """affine_grid matrices (output -> input) of the forward maps x' = R Sh S x + t."""
    n = len(rot)
    c, s = np.cos(rot), np.sin(rot)
    R = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    Sh = np.zeros((n, 2, 2))
    Sh[:, 0, 0] = 1.0
    Sh[:, 0, 1] = shear
    Sh[:, 1, 1] = 1.0
    S = np.zeros((n, 2, 2))
    S[:, 0, 0] = scale * aspect
    S[:, 1, 1] = scale / aspect
    A = R @ Sh @ S
    inv = np.linalg.inv(A)
    t = np.stack([tx, ty], -1)[..., None]
    theta = np.concatenate([inv, -inv @ t], axis=-1)
    return torch.from_numpy(theta.astype(np.float32))


def _warp(templates: torch.Tensor, idx: np.ndarray, theta: torch.Tensor, xx: torch.Tensor,
          yy: torch.Tensor) -> torch.Tensor:
    """Templates ``idx`` resampled through ``theta`` (n, 2, 3) at output pixel centres
    ``xx``/``yy`` (affine_grid's sampling grid, built by hand: cheaper on one core)."""
    th = theta[:, None, None]  # n,1,1,2,3
    grid = th[..., 0] * xx[..., None] + th[..., 2]  # n,H,W,2
    grid.addcmul_(th[..., 1], yy[..., None])
    return torch.nn.functional.grid_sample(templates[torch.from_numpy(idx)], grid,
                                           mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[:, 0]


def _blur(img: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """A separable Gaussian blur of each image (n, C, H, W) with its own ``sigma`` (pixels),
    by shifted multiply-adds (a grouped conv2d is slower on one core); edges replicated."""
    radius = max(1, int(np.ceil(3 * sigma.max())))
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    ker = np.exp(-(k[None] ** 2) / (2 * np.maximum(sigma, 1e-3)[:, None] ** 2))
    ker = torch.from_numpy((ker / ker.sum(1, keepdims=True)).astype(np.float32))  # n, K
    h, w = img.shape[-2:]
    x = torch.nn.functional.pad(img, (radius, radius, 0, 0), mode="replicate")
    out = x[..., 0:w] * ker[:, 0, None, None, None]
    for j in range(1, 2 * radius + 1):
        out.addcmul_(x[..., j:j + w], ker[:, j, None, None, None])
    x = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="replicate")
    out = x[..., 0:h, :] * ker[:, 0, None, None, None]
    for j in range(1, 2 * radius + 1):
        out.addcmul_(x[..., j:j + h, :], ker[:, j, None, None, None])
    return out


def _colours(rng: np.random.Generator, n: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    """(background, foreground) RGB in [0, 1], shape (n, 3): grey levels whose difference is at
    least ``0.7 - 0.5 d``, plus a per-channel tint of up to ``0.1 + 0.3 d``."""
    min_contrast = 0.7 - 0.5 * d
    bg = rng.uniform(0.0, 1.0, n)
    delta = rng.uniform(min_contrast, 1.0, n)
    up = rng.uniform(size=n) < 0.5
    fg = np.where(up, bg + delta, bg - delta)
    fg = np.where(fg > 1.0, bg - delta, np.where(fg < 0.0, bg + delta, fg))
    fg = np.clip(fg, 0.0, 1.0)
    tint = 0.1 + 0.3 * d
    bg_rgb = np.clip(bg[:, None] + rng.uniform(-tint, tint, (n, 3)), 0.0, 1.0)
    fg_rgb = np.clip(fg[:, None] + rng.uniform(-tint, tint, (n, 3)), 0.0, 1.0)
    return bg_rgb, fg_rgb


def _glyph_batch(rng: np.random.Generator, templates: torch.Tensor, covered: np.ndarray,
                 labels: np.ndarray, size: int, d: float) -> torch.Tensor:
    """RGB uint8 images (n, 3, size, size) of the glyphs ``labels`` under the augmentations.

    Everything up to the colours is computed on one channel: the glyph's coverage ``g``,
    the fragments behind it ``b``, the strokes over it ``o`` and a background gradient; the
    RGB image is then one batched product of per-image colours with those maps."""
    n = len(labels)
    n_classes, n_fonts = covered.shape
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0  # pixel centres
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    pix = 2.0 / size

    def col(a: np.ndarray) -> torch.Tensor:  # (n,) -> (n, 1, 1) float32
        return torch.from_numpy(np.asarray(a, dtype=np.float32))[:, None, None]

    n_cover = covered.sum(1)
    cover_idx = np.argsort(~covered, axis=1, kind="stable")  # covering fonts first, in order

    def font_of(classes: np.ndarray) -> np.ndarray:  # a random font that has the character
        pick = (rng.uniform(size=len(classes)) * n_cover[classes]).astype(np.int64)
        return np.asarray(cover_idx[classes, pick], dtype=np.int64)

    # the glyph under a random affine map
    theta = _affine_theta(
        rot=np.deg2rad(rng.uniform(-35.0, 35.0, n) * d),
        scale=np.exp(rng.uniform(-0.35, 0.2, n) * d),
        aspect=np.exp(rng.uniform(-0.2, 0.2, n) * d),
        shear=rng.uniform(-0.35, 0.35, n) * d,
        tx=rng.uniform(-0.25, 0.25, n) * d, ty=rng.uniform(-0.25, 0.25, n) * d)
    g = _warp(templates, labels * n_fonts + font_of(labels), theta, xx, yy)  # n,H,W

    # clutter behind the glyph: fragments (a half-plane each) of other glyphs, off-centre
    b = torch.zeros(n, size, size)
    for _ in range(int(round(4 * d))):
        active = rng.uniform(size=n) < 0.6
        other = rng.integers(0, n_classes, n)
        ang = rng.uniform(0.0, 2 * np.pi, n)
        rad = rng.uniform(0.45, 0.95, n)
        th = _affine_theta(rot=rng.uniform(-np.pi, np.pi, n),
                           scale=np.exp(rng.uniform(-0.3, 0.2, n)),
                           aspect=np.ones(n), shear=rng.uniform(-0.3, 0.3, n),
                           tx=rad * np.cos(ang), ty=rad * np.sin(ang))
        frag = _warp(templates, other * n_fonts + font_of(other), th, xx, yy)
        phi = rng.uniform(0.0, 2 * np.pi, n)
        keep = (xx * col(np.cos(phi)) + yy * col(np.sin(phi))) > col(rng.uniform(-0.3, 0.3, n))
        strength = col(active * rng.uniform(0.5, 1.0, n))
        b = torch.maximum(b, frag * keep * strength)

    # random strokes over the glyph: soft-edged segments 1-3 px wide
    o = torch.zeros(n, size, size)
    for _ in range(int(round(3 * d))):
        active = rng.uniform(size=n) < 0.5
        p = rng.uniform(-1.0, 1.0, (n, 2))
        v = rng.uniform(-1.0, 1.0, (n, 2)) - p
        vv = np.maximum((v * v).sum(1), 1e-6)
        rx, ry = xx - col(p[:, 0]), yy - col(p[:, 1])
        t = ((rx * col(v[:, 0] / vv) + ry * col(v[:, 1] / vv))).clamp_(0.0, 1.0)
        dist = torch.hypot(rx - t * col(v[:, 0]), ry - t * col(v[:, 1]))
        line = ((col(rng.uniform(0.5, 1.5, n) * pix) - dist) / pix + 0.5).clamp_(0.0, 1.0)
        o = torch.maximum(o, line * col(active * rng.uniform(0.6, 1.0, n)))

    # colours (contrast-jittered around their mid-point); clutter in the glyph's colour or not
    bg, fg = _colours(rng, n, d)
    _, other_col = _colours(rng, n, d)
    clutter = np.where((rng.uniform(size=n) < 0.5)[:, None], fg, other_col)
    contrast = np.exp(rng.uniform(-0.5, 0.1, n) * d)[:, None]
    mid = (bg + fg) / 2
    bg, fg, clutter = (np.clip(mid + (c - mid) * contrast, 0.0, 1.0) for c in (bg, fg, clutter))
    gphi = rng.uniform(0.0, 2 * np.pi, n)
    grad = (xx * col(np.cos(gphi)) + yy * col(np.sin(gphi))) * col(rng.uniform(-0.3, 0.3, n) * d)
    # composite background < fragments < glyph < strokes, as weights of 4 maps
    w_bg = (1 - b) * (1 - g) * (1 - o)
    w_fg = g * (1 - o)
    w_cl = 1 - w_bg - w_fg
    maps = torch.empty(n, 4, size, size)
    maps[:, 0], maps[:, 2], maps[:, 3] = w_bg, w_fg, w_cl
    torch.mul(w_bg, grad, out=maps[:, 1])
    coef = np.stack([bg, np.ones_like(bg), fg, clutter], -1).astype(np.float32)  # n,3,4
    img = torch.bmm(torch.from_numpy(coef), maps.reshape(n, 4, size * size))
    img = img.reshape(n, 3, size, size)

    # blur: a Gaussian per image, sigma up to 1.5 px (at 64 px) times difficulty
    sigma = rng.uniform(0.0, 1.5, n) * d * size / 64.0
    if sigma.max() > 0.05:
        img = _blur(img, sigma)

    # pixel noise, then 8 bits
    noise_sd = rng.uniform(0.0, 0.15, n) * d * 255.0
    noise = torch.from_numpy(rng.standard_normal((n, 3, size, size), dtype=np.float32))
    img = img.mul_(255.0).add_(noise.mul_(col(noise_sd)[:, None]))
    return img.clamp_(0.0, 255.0).round_().to(torch.uint8)


def _generate_split(templates: torch.Tensor, covered: np.ndarray, size: int, d: float, n: int,
                    seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_classes = covered.shape[0]
    rng = np.random.default_rng([GLYPHS_VERSION, seed, split])
    labels = rng.permutation(np.arange(n) % n_classes)  # balanced: every class n // k times
    xs = [torch.zeros(0, 3, size, size, dtype=torch.uint8)]
    for start in range(0, n, _GEN_BATCH):
        sub = np.random.default_rng([GLYPHS_VERSION, seed, split, start])
        xs.append(_glyph_batch(sub, templates, covered, labels[start:start + _GEN_BATCH],
                               size, d))
    return torch.cat(xs), torch.from_numpy(labels.astype(np.int64))


def generate_glyphs(size: int, n_classes: int, difficulty: float, n_train: int, n_test: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """Draw the glyphs task (no cache): ``x_train``/``x_test`` uint8 RGB (N, 3, size, size),
    ``y_train``/``y_test`` int64 labels. Arguments as ``glyphs_tensors`` (already checked)."""
    templates, covered = _render_templates(size, n_classes)
    x_tr, y_tr = _generate_split(templates, covered, size, difficulty, n_train, seed, 0)
    x_te, y_te = _generate_split(templates, covered, size, difficulty, n_test, seed, 1)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def _glyphs_key(size: int, n_classes: int, d: float, n_train: int, n_test: int,
                seed: int) -> dict[str, Any]:
    return {"task": "glyphs", "version": GLYPHS_VERSION, "size": size, "n_classes": n_classes,
            "difficulty": d, "n_train": n_train, "n_test": n_test, "seed": seed,
            "classes": "".join(GLYPH_CLASSES[:n_classes]), "fonts": list(GLYPH_FONTS)}


def glyphs_cache_path(key: dict[str, Any], root: Path) -> Path:
    """The file a glyphs task with generation parameters ``key`` is cached in under ``root``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"glyphs-v{key['version']}-{key['size']}px-{key['n_classes']}c-{digest}.pt"


def _load_glyphs(path: Path, key: dict[str, Any]) -> dict[str, torch.Tensor]:
    fix = "delete it to generate the data again"
    try:
        obj = safe_torch_load(path)
    except CorruptFileError as e:  # it names the file and what torch said
        raise CorruptFileError(f"{e}; {fix}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), str):
        raise CorruptFileError(f"{path}: not a glyphs cache file (no metadata); {fix}")
    try:
        meta = json.loads(obj["meta"])
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: glyphs cache metadata is not JSON; {fix}") from None
    if meta != key:
        raise CorruptFileError(f"{path}: glyphs cache holds other parameters ({meta}); {fix}")
    s = key["size"]
    for part, n in (("train", key["n_train"]), ("test", key["n_test"])):
        x, y = obj.get(f"x_{part}"), obj.get(f"y_{part}")
        if (not isinstance(x, torch.Tensor) or x.dtype != torch.uint8
                or tuple(x.shape) != (n, 3, s, s)):
            raise CorruptFileError(f"{path}: x_{part} is missing or not uint8 ({n}, 3, {s}, {s}); "
                                   f"{fix}")
        if (not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (n,)
                or (n and (int(y.min()) < 0 or int(y.max()) >= key["n_classes"]))):
            raise CorruptFileError(f"{path}: y_{part} is missing or has labels outside "
                                   f"0..{key['n_classes'] - 1}; {fix}")
    return {k: obj[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def _to_float(x: torch.Tensor, channels: int) -> torch.Tensor:
    f = x.float() / 255.0
    if channels == 1:  # ITU-R BT.601 luma
        f = (0.299 * f[:, 0:1] + 0.587 * f[:, 1:2] + 0.114 * f[:, 2:3])
    return (f - 0.5) / 0.5


GlyphsRoot = str | Path | None | Literal[False]


def glyphs_tensors(
    size: int = 64, channels: int = 3, n_classes: int = 64,
    difficulty: float | str = GLYPHS_DEFAULT_DIFFICULTY, n_train: int = 10_000,
    n_test: int = 2_000, seed: int = 0, root: GlyphsRoot = None,
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of the glyphs task: inputs float32 (N, channels, size, size) in
    [-1, 1], labels int64 in ``0..n_classes-1`` (every class equally often, shuffled).

    Each image is one of the first ``n_classes`` characters of ``GLYPH_CLASSES`` (digits,
    letters, symbols, Greek), drawn with a random one of the ``GLYPH_FONTS`` that matplotlib
    ships (DejaVu Sans/Serif/Mono and STIX, regular/bold/italic), under a random affine map
    (rotation, scale, aspect, shear, shift), behind random strokes and over cut fragments of
    other glyphs, in jittered colours and contrast, blurred, with pixel noise. ``difficulty``
    (0..1, or ``"easy"``/``"medium"``/``"hard"``/``"extreme"``) scales all of these; at 0 a
    glyph is centred, upright and clean. Train and test come from separate random streams of
    the same fonts. The same arguments give bit-identical tensors, in any process.

    Generated once, then cached as uint8 under ``root`` (default
    ``autoprune.io.cache_dir()/"glyphs"``; ``root=False`` generates in memory every time), in
    a file keyed by every generation parameter and ``GLYPHS_VERSION``. A cache file that
    cannot be read or does not match raises ``CorruptFileError`` naming it.
    """
    size = _check_count("size", size, _MIN_GLYPH_SIZE)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise InvalidInputError(f"channels={channels!r} must be 1 (grey) or 3 (RGB)")
    n_classes = _check_count("n_classes", n_classes, 2, len(GLYPH_CLASSES))
    d = _glyph_difficulty(difficulty)
    n_train = _check_count("n_train", n_train, 1)
    n_test = _check_count("n_test", n_test, 1)
    seed = _check_count("seed", seed, 0)
    given: object = root  # checked at run time whatever the annotation says
    if given is not None and given is not False and not isinstance(given, (str, Path)):
        raise InvalidInputError(f"root={root!r} must be a directory path, None (the autoprune "
                                "cache directory) or False (no cache)")
    key = _glyphs_key(size, n_classes, d, n_train, n_test, seed)
    if root is False:
        data = generate_glyphs(size, n_classes, d, n_train, n_test, seed)
    else:
        base = cache_dir() / "glyphs" if root is None else Path(root)
        path = glyphs_cache_path(key, base)
        with file_lock(base / ".lock"):  # one process generates, the others wait and read
            if path.exists():
                data = _load_glyphs(path, key)
            else:
                data = generate_glyphs(size, n_classes, d, n_train, n_test, seed)
                atomic_torch_save({"meta": json.dumps(key, sort_keys=True), **data}, path)
    return (TensorDataset(_to_float(data["x_train"], channels), data["y_train"]),
            TensorDataset(_to_float(data["x_test"], channels), data["y_test"]))


def glyphs_loaders(
    size: int = 64, channels: int = 3, n_classes: int = 64,
    difficulty: float | str = GLYPHS_DEFAULT_DIFFICULTY, n_train: int = 10_000,
    n_test: int = 2_000, batch_size: int = 64, seed: int = 0, root: GlyphsRoot = None,
) -> tuple[Loader, Loader]:
    """(train, test) loaders of the glyphs task (``glyphs_tensors``); the train loader shuffles
    with ``seed``."""
    batch_size = _check_count("batch_size", batch_size, 1)
    train, test = glyphs_tensors(size=size, channels=channels, n_classes=n_classes,
                                 difficulty=difficulty, n_train=n_train, n_test=n_test,
                                 seed=seed, root=root)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=256, shuffle=False),
    )
