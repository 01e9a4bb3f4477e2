"""Make sample_data/: a small street-scene-like set with a fixed seed.

    python scripts/make_sample_data.py [OUT_DIR]

Eight 120×160 scenes with five classes (road, building, vegetation, sky, car):
- targets are palette PNGs (palette index = class id) with an ignore region (255) where the
  ego vehicle's bonnet would be;
- predictions are softmax outputs that are confident inside regions, uncertain along
  boundaries, with a few confident mistakes (a car taken for road, a tree for a building);
  float32 with exact 0.0 and 1.0 where the softmax saturates, as real output has;
- even-numbered scenes are .npy (H, W, C); odd ones are zlib-compressed .tif (C, H, W);
- scene 7 has no car at all, neither in the target nor in the prediction;
- images/ holds a synthetic "photo" of each scene (JPEG) for ``klseg heatmap --overlay``;
- predictions_b/ holds a second model's maps of the same scenes (``klseg compare``), as
  compressed float16 .npz (H, W, C): less sharp than the first, it gets the cars of scenes 1 and 4
  right but takes a patch of road for a car in scenes 3 and 6 and misses trees in 5.
  Its own random stream: the first model's files do not change.
- raters/rater_a, rater_b, rater_c hold three raters' masks of the same scenes (palette PNGs,
  ``klseg evaluate --rater``): the ground truth warped by a smooth random displacement of a
  few pixels, so the raters disagree along boundaries (rater_c the most); the bonnet is
  ignored (255) by every rater, and a rater's warp may carry a sliver of it further, which
  that rater alone ignores. Their own random stream: no other file changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

CLASSES = ["road", "building", "vegetation", "sky", "car"]
PALETTE = [(128, 64, 128), (70, 70, 70), (107, 142, 35), (70, 130, 180), (0, 0, 142)]
H, W, C = 120, 160, len(CLASSES)
IGNORE = 255
SEED = 20261127


def box_blur(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window along the last two axes, edges padded by reflection."""
    pad = [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)]
    p = np.pad(x, pad, mode="edge")
    c = p.cumsum(-1)
    c = np.concatenate([np.zeros_like(c[..., :1]), c], -1)
    p = (c[..., 2 * r + 1 :] - c[..., : -2 * r - 1]) / (2 * r + 1)
    c = p.cumsum(-2)
    c = np.concatenate([np.zeros_like(c[..., :1, :]), c], -2)
    return (c[..., 2 * r + 1 :, :] - c[..., : -2 * r - 1, :]) / (2 * r + 1)


def scene(rng: np.random.Generator, index: int) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    mask = np.full((H, W), 1, dtype=np.uint8)  # building by default
    horizon = 35 + 10 * np.sin(xx / rng.uniform(15, 30) + rng.uniform(0, 6)) + rng.integers(-5, 5)
    mask[yy < horizon] = 3  # sky
    for _ in range(rng.integers(2, 5)):  # trees
        cy, cx, r = rng.uniform(35, 70), rng.uniform(0, W), rng.uniform(10, 22)
        mask[(yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r * r] = 2
    road_top = 70 + rng.integers(-6, 6)
    half = (yy - road_top) * 1.4 + 10
    mask[(yy >= road_top) & (np.abs(xx - W / 2) < half)] = 0
    if index != 7:
        for _ in range(rng.integers(1, 4)):  # cars on the road
            cy, cx = rng.integers(road_top + 8, H - 25), rng.integers(30, W - 30)
            h, w = rng.integers(8, 16), rng.integers(14, 26)
            mask[cy : cy + h, cx : cx + w] = 4
    depth = rng.integers(6, 16)  # the bonnet's height varies, so images differ in n_valid
    bonnet = (yy > H - depth) & (np.abs(xx - W / 2) < 60 - (H - yy) * 2)
    mask[bonnet] = IGNORE
    return mask


def predict(rng: np.random.Generator, mask: np.ndarray, index: int) -> np.ndarray:
    """Softmax of logits that follow a blurred target: sharp inside regions, soft at edges."""
    labels = np.where(mask == IGNORE, 0, mask)
    onehot = (labels[None] == np.arange(C)[:, None, None]).astype(np.float64)
    soft = box_blur(onehot, 3)
    logits = 16.0 * np.log(soft + 1e-3) + rng.normal(0, 2.5, size=(C, H, W))
    logits += box_blur(rng.normal(0, 20.0, size=(C, H, W)), 5)  # smooth, region-wise doubt
    # a few confident mistakes
    if index in (1, 4):
        cars = np.argwhere(labels == 4)
        if len(cars):
            y0, x0 = cars[0]
            logits[0, y0 : y0 + 10, x0 : x0 + 12] += 130.0  # a car seen as road
    if index in (2, 5):
        trees = np.argwhere(labels == 2)
        if len(trees):
            y0, x0 = trees[len(trees) // 2]
            logits[1, max(0, y0 - 8) : y0 + 8, max(0, x0 - 8) : x0 + 8] += 130.0  # tree → building
    if index == 7:
        logits[4] -= 60.0  # no car predicted anywhere
    # softmax in float32, as a network computes it: tiny probabilities underflow to exactly
    # 0.0 and confident pixels round to exactly 1.0
    logits = logits.astype(np.float32)
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs


def predict_b(rng: np.random.Generator, mask: np.ndarray, index: int) -> np.ndarray:
    """A second model: softer logits, other noise, other confident mistakes."""
    labels = np.where(mask == IGNORE, 0, mask)
    onehot = (labels[None] == np.arange(C)[:, None, None]).astype(np.float64)
    soft = box_blur(onehot, 4)
    logits = 11.0 * np.log(soft + 1e-3) + rng.normal(0, 2.0, size=(C, H, W))
    logits += box_blur(rng.normal(0, 18.0, size=(C, H, W)), 6)
    if index in (3, 6):
        roads = np.argwhere(labels == 0)
        if len(roads):
            y0, x0 = roads[len(roads) // 3]
            logits[4, y0 : y0 + 12, x0 : x0 + 18] += 120.0  # road seen as a car
    if index == 5:
        logits[2][labels == 2] -= 25.0  # trees taken for buildings
        logits[1][labels == 2] += 25.0
    logits = logits.astype(np.float32)
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs


def photo(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A photo-like RGB rendering of a scene: muted class colours, shading and texture."""
    labels = np.where(mask == IGNORE, 1, mask)
    base = np.array(PALETTE, dtype=np.float64)[labels]
    base = 0.55 * base + 0.45 * np.array([150.0, 150.0, 150.0])
    yy = np.linspace(1.1, 0.8, H)[:, None, None]
    texture = box_blur(rng.normal(0, 25, size=(1, H, W)), 1)[0][..., None]
    rgb = base * yy + texture
    rgb[mask == IGNORE] = [40, 40, 45]  # the bonnet
    return np.clip(rgb, 0, 255).astype(np.uint8)


def main(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    photo_rng = np.random.default_rng(SEED + 1)  # its own stream: the maps do not change
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    palette = [v for rgb in PALETTE for v in rgb] + [0, 0, 0] * (256 - len(PALETTE))
    for i in range(8):
        stem = f"scene_{i:02d}"
        mask = scene(rng, i)
        img = Image.fromarray(mask, mode="P")
        img.putpalette(palette)
        img.save(out / "ground_truth" / f"{stem}.png", optimize=True)
        probs = predict(rng, mask, i)  # (C, H, W)
        Image.fromarray(photo(photo_rng, mask)).save(out / "images" / f"{stem}.jpg", quality=85)
        if i % 2 == 0:
            np.save(
                out / "predictions" / f"{stem}.npy", np.ascontiguousarray(probs.transpose(1, 2, 0))
            )
        else:
            tifffile.imwrite(
                out / "predictions" / f"{stem}.tif",
                probs,
                photometric="minisblack",
                compression="zlib",
            )
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_model_b(out)
    write_raters(out)


def write_model_b(out: Path) -> None:
    """predictions_b/: the second model, from the same scenes (replayed from SEED)."""
    rng = np.random.default_rng(SEED)
    b_rng = np.random.default_rng(SEED + 2)
    (out / "predictions_b").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        mask = scene(rng, i)
        predict(rng, mask, i)  # keeps the scene stream where main() has it
        probs = predict_b(b_rng, mask, i)
        np.savez_compressed(
            out / "predictions_b" / f"scene_{i:02d}.npz",
            probs=np.ascontiguousarray(probs.transpose(1, 2, 0)).astype(np.float16),
        )


RATERS = {"rater_a": 1.5, "rater_b": 2.5, "rater_c": 3.5}
"""Each rater's typical boundary displacement, in pixels."""


def rater_mask(rng: np.random.Generator, mask: np.ndarray, shift: float) -> np.ndarray:
    """The mask as a rater would draw it: sampled through a smooth random displacement field
    (nearest neighbour), so region boundaries move by about ``shift`` pixels."""
    yy, xx = np.mgrid[0:H, 0:W]
    field = box_blur(rng.normal(0, 1, size=(2, H, W)), 8)
    field *= shift / max(float(np.abs(field).max()), 1e-9)
    sy = np.clip(np.rint(yy + field[0]), 0, H - 1).astype(np.intp)
    sx = np.clip(np.rint(xx + field[1]), 0, W - 1).astype(np.intp)
    drawn = mask[sy, sx]
    drawn[mask == IGNORE] = IGNORE  # nobody labels the bonnet
    return drawn


def write_raters(out: Path) -> None:
    """raters/<name>/: three raters' masks of the same scenes (replayed from SEED)."""
    rng = np.random.default_rng(SEED)
    rater_rng = np.random.default_rng(SEED + 3)
    palette = [v for rgb in PALETTE for v in rgb] + [0, 0, 0] * (256 - len(PALETTE))
    for name in RATERS:
        (out / "raters" / name).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        mask = scene(rng, i)
        predict(rng, mask, i)  # keeps the scene stream where main() has it
        for name, shift in RATERS.items():
            img = Image.fromarray(rater_mask(rater_rng, mask, shift), mode="P")
            img.putpalette(palette)
            img.save(out / "raters" / name / f"scene_{i:02d}.png", optimize=True)


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "sample_data"
    )
