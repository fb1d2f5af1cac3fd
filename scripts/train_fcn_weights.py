"""Train the weights ``edgelearn video --model fcn`` loads by default (``python/edgelearn/models/weights/fcn.safetensors``).

Task (self-supervised, per pixel, on real photos): local structure at 1/4 resolution (the ``fcn`` output). From
the luma of the image, Gaussian-derivative gradients (sigma 1 px) give a structure tensor (smoothed, sigma 3 px)
per 4x4 block; class 0 is "flat" (gradient energy below the median over the training photos), classes 1-4 are
the dominant edge orientation in 45-degree bins (1: horizontal edges, 2: rising diagonals, 3: vertical, 4:
falling diagonals); outputs 5-15 are never the target. Each batch holds clean crops and the same crops with
Gaussian noise (std drawn per crop from [0, 0.03]); both learn the clean crop's labels, and a consistency term
(weight 100) pulls the noisy outputs towards the clean ones (relative squared L2), so the head learns decisions,
and outputs, that small sensor and codec noise does not move. A colour classifier (tried first: 16 k-means colours) flips all along smooth gradients
and a random head's argmax sits near ties everywhere; with this head ``--compare-dense``'s per-pixel argmax
agreement measures patch skip rather than noise.

Data: the RGB photos Debian's ``opencv-doc`` ships (``apt-get install opencv-doc``;
``/usr/share/doc/opencv-doc/examples/data/*.jpg|png``: fruits, baboon, building, home, messi5, ...); its videos
(``vtest.avi``, ``tree.avi``, ``Megamind*.avi``), which the video benchmark uses, are not read. Random crops
(64x64, scaled 0.35-1x, mirrored), Adam, cross-entropy, float32. Needs torch (only to regenerate the file; the
package does not depend on it) and Pillow. The weights are stored as float16 (BatchNorm buffers float32) to keep
the file small; the package loads them as float32.

Run: ``python scripts/train_fcn_weights.py [--steps 1500] [--out python/edgelearn/models/weights/fcn.safetensors]``
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
OUTPUTS = 16
ORIENTATIONS = 4
CROP = 64
NOISE = 0.03  # largest std of the Gaussian noise added to the inputs (labels come from the clean crop)
CONSISTENCY = 100.0  # weight of the relative squared L2 distance between the outputs on noisy and clean crops


def photos(folder: str):
    from PIL import Image

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jpg")) + glob.glob(os.path.join(folder, "*.png"))):
        im = Image.open(path)
        if im.mode != "RGB":  # greyscale calibration boards, logos with alpha, masks
            continue
        out.append(np.asarray(im, np.float32) / 255.0)
    if not out:
        raise SystemExit(f"no RGB photos in {folder}: apt-get install opencv-doc")
    return out


def structure(img: np.ndarray):
    """Per 4x4 block: gradient energy and edge orientation (radians in [0, pi)) of the luma's structure tensor."""
    from scipy import ndimage

    h, w = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
    y = img[:h, :w] @ np.array([0.299, 0.587, 0.114], np.float32)
    gy = ndimage.gaussian_filter(y, 1.0, order=(1, 0), mode="nearest")
    gx = ndimage.gaussian_filter(y, 1.0, order=(0, 1), mode="nearest")
    jxx, jyy, jxy = (ndimage.gaussian_filter(a, 3.0, mode="nearest") for a in (gx * gx, gy * gy, gx * gy))
    block = lambda a: a.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))  # noqa: E731
    jxx, jyy, jxy = block(jxx), block(jyy), block(jxy)
    energy = jxx + jyy
    # gradient direction; the edge runs across it: a horizontal edge has a vertical gradient
    theta = (0.5 * np.arctan2(2 * jxy, jxx - jyy) + np.pi / 2) % np.pi
    return energy, theta


def labels(img: np.ndarray, flat: float) -> np.ndarray:
    energy, theta = structure(img)
    bins = 1 + np.rint(theta / (np.pi / ORIENTATIONS)).astype(np.int64) % ORIENTATIONS
    return np.where(energy < flat, 0, bins)


def crop(imgs, rng) -> np.ndarray:
    from PIL import Image

    im = imgs[rng.integers(len(imgs))]
    scale = rng.uniform(0.35, 1.0)
    side = int(CROP / scale)
    h, w = im.shape[:2]
    side = min(side, h, w)
    y, x = rng.integers(h - side + 1), rng.integers(w - side + 1)
    c = im[y:y + side, x:x + side]
    if side != CROP:
        c = np.asarray(Image.fromarray((c * 255).round().astype(np.uint8)).resize((CROP, CROP), Image.BILINEAR),
                       np.float32) / 255.0
    if rng.random() < 0.5:
        c = c[:, ::-1]
    return np.ascontiguousarray(c)


def torch_fcn():
    import torch.nn as tnn

    layers, prev = [], 3
    for i, ch in enumerate((16, 32, 32, 64)):  # edgelearn.models.fcn(): same modules, same indices
        layers += [tnn.Conv2d(prev, ch, 3, stride=2 if i % 2 else 1, padding=1), tnn.BatchNorm2d(ch), tnn.ReLU()]
        prev = ch
    layers.append(tnn.Conv2d(prev, OUTPUTS, 1))
    return tnn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--data", default=OPENCV_DATA)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "python", "edgelearn", "models",
                                                  "weights", "fcn.safetensors"))
    args = ap.parse_args()
    import torch
    from safetensors.numpy import save_file

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs = photos(args.data)
    flat = float(np.percentile(np.concatenate([structure(im)[0].ravel() for im in imgs]), 50))
    held = [imgs[i] for i in range(0, len(imgs), 8)]  # every 8th photo: held-out accuracy
    train = [im for i, im in enumerate(imgs) if i % 8]
    model = torch_fcn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.time()
    for step in range(args.steps):
        # half a batch of clean crops and the same crops with noise: both learn the labels of the clean
        # crop, and the noisy outputs are pulled towards the clean ones (relative squared L2)
        xs = [crop(train, rng) for _ in range(args.batch // 2)]
        ys = torch.from_numpy(np.stack([labels(c, flat) for c in xs]))
        x = np.stack(xs).transpose(0, 3, 1, 2).copy()
        noisy = x + (rng.uniform(0, NOISE, (len(x), 1, 1, 1)) * rng.standard_normal(x.shape)).astype(np.float32)
        out = model(torch.from_numpy(np.concatenate([x, noisy])))
        clean, moved = out[: len(x)], out[len(x):]
        consistency = (moved - clean).pow(2).mean() / clean.detach().pow(2).mean()
        loss = torch.nn.functional.cross_entropy(out, torch.cat([ys, ys])) + CONSISTENCY * consistency
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        acc = []
        for im in held:
            h, w = im.shape[0] // 4 * 4, im.shape[1] // 4 * 4
            out = model(torch.from_numpy(im[:h, :w].transpose(2, 0, 1).copy())[None])[0].argmax(0).numpy()
            acc.append(float((out == labels(im, flat)).mean()))
    print(f"held-out pixel accuracy ({len(held)} photos): {np.mean(acc):.3f}")
    state = {}
    for k, v in model.state_dict().items():
        a = v.numpy()
        if k.endswith("num_batches_tracked"):
            continue
        state[k] = a.astype(np.float32 if "running" in k else np.float16)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(state, args.out, metadata={"task": "structure at 1/4 resolution: 0 flat, 1-8 edge orientation (22.5 deg bins)",
                                         "flat_energy": f"{flat:.6g}",
                                         "data": "opencv-doc RGB photos", "steps": str(args.steps),
                                         "held_out_accuracy": f"{np.mean(acc):.4f}"})
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
