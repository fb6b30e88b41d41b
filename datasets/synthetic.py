"""A small synthetic re-ID dataset in the Market-1501 layout, drawn procedurally (no downloads).

Every identity is a figure with its own clothing colours, a pattern on the top (plain, stripes or
checks), trousers, skin tone, an optional bag and a body shape; every camera has its own background,
lighting and colour cast; every image jitters position, scale and pose and adds noise. A network can
learn to tell the identities apart, and the camera changes make it non-trivial.

    python -m datasets.synthetic --out data/synthetic        # writes data/synthetic/market1501/...

The gallery also holds distractors (pid 0, figures of no query identity) and junk images (pid -1),
so the parsers' and the evaluation's handling of both is exercised.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 64, 32


@dataclass(frozen=True)
class Identity:
    top: np.ndarray  # RGB 0..1
    top2: np.ndarray  # second colour of the pattern
    pattern: int  # 0 plain, 1 horizontal stripes, 2 vertical stripes, 3 checks
    bottom: np.ndarray
    skin: np.ndarray
    bag: np.ndarray | None
    width_scale: float
    leg_ratio: float


def random_identity(rng: np.random.Generator) -> Identity:
    def colour() -> np.ndarray:
        return rng.uniform(0.05, 0.95, 3)
    return Identity(top=colour(), top2=colour(), pattern=int(rng.integers(0, 4)), bottom=colour(),
                    skin=np.array([0.9, 0.75, 0.6]) * rng.uniform(0.45, 1.0),
                    bag=colour() if rng.random() < 0.5 else None,
                    width_scale=float(rng.uniform(0.75, 1.1)), leg_ratio=float(rng.uniform(0.38, 0.5)))


@dataclass(frozen=True)
class Camera:
    background: np.ndarray
    gain: float
    cast: np.ndarray


def random_camera(rng: np.random.Generator) -> Camera:
    return Camera(background=rng.uniform(0.2, 0.8, 3), gain=float(rng.uniform(0.7, 1.2)),
                  cast=rng.uniform(0.85, 1.15, 3))


def draw(identity: Identity, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """One HEIGHTxWIDTH uint8 RGB image of ``identity`` seen by ``camera``."""
    img = np.empty((HEIGHT, WIDTH, 3))
    img[:] = camera.background
    img += rng.normal(0, 0.04, (HEIGHT, 1, 3))  # background texture varies by row
    scale = rng.uniform(0.85, 1.0)
    body_h = int(HEIGHT * scale)
    top_y = int(rng.integers(0, HEIGHT - body_h + 1))
    body_w = max(6, int(WIDTH * 0.55 * identity.width_scale * rng.uniform(0.9, 1.1)))
    left = int(np.clip(WIDTH // 2 - body_w // 2 + rng.integers(-3, 4), 0, WIDTH - body_w))
    head_h = max(4, body_h // 7)
    legs_h = int(body_h * identity.leg_ratio)
    torso_h = body_h - head_h - legs_h
    head_w = max(3, body_w // 2)
    head_left = left + (body_w - head_w) // 2
    img[top_y:top_y + head_h, head_left:head_left + head_w] = identity.skin
    y0 = top_y + head_h
    torso = np.empty((torso_h, body_w, 3))
    torso[:] = identity.top
    rows, cols = np.mgrid[0:torso_h, 0:body_w]
    period = 4
    if identity.pattern == 1:
        torso[(rows // period) % 2 == 1] = identity.top2
    elif identity.pattern == 2:
        torso[(cols // period) % 2 == 1] = identity.top2
    elif identity.pattern == 3:
        torso[((rows // period) + (cols // period)) % 2 == 1] = identity.top2
    if rng.random() < 0.5:  # seen from the other side: mirror the pattern
        torso = torso[:, ::-1]
    img[y0:y0 + torso_h, left:left + body_w] = torso
    y1 = y0 + torso_h
    gap = max(1, body_w // 6)
    leg_w = (body_w - gap) // 2
    stride = int(rng.integers(-2, 3))  # walking pose
    img[y1:y1 + legs_h, left + max(0, stride):left + leg_w + max(0, stride)] = identity.bottom
    img[y1:y1 + legs_h, left + leg_w + gap - min(0, stride):left + body_w - min(0, stride)] = identity.bottom
    if identity.bag is not None:
        bag_h, bag_w = max(3, torso_h // 2), max(3, body_w // 3)
        side = left - bag_w // 2 if rng.random() < 0.5 else left + body_w - bag_w // 2
        side = int(np.clip(side, 0, WIDTH - bag_w))
        img[y0 + torso_h // 3:y0 + torso_h // 3 + bag_h, side:side + bag_w] = identity.bag
    img = img * camera.gain * camera.cast * rng.uniform(0.9, 1.1)
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _save(img: np.ndarray, folder: str, pid: int, camera: int, frame: int) -> None:
    name = f"{pid:04d}_c{camera + 1}s1_{frame:06d}_00.jpg" if pid >= 0 else f"-1_c{camera + 1}s1_{frame:06d}_00.jpg"
    Image.fromarray(img).save(os.path.join(folder, name), quality=92)


def generate(out_root: str, *, train_ids: int = 32, test_ids: int = 24, cameras: int = 4,
             images_per_camera: int = 3, distractors: int = 20, junk: int = 10, seed: int = 0) -> str:
    """Write ``out_root/market1501/{bounding_box_train,query,bounding_box_test}``; returns that folder."""
    rng = np.random.default_rng(seed)
    root = os.path.join(out_root, "market1501")
    folders = {name: os.path.join(root, name) for name in ("bounding_box_train", "query", "bounding_box_test")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    cams = [random_camera(rng) for _ in range(cameras)]
    frame = 0
    for pid in range(1, train_ids + 1):
        person = random_identity(rng)
        for cam in range(cameras):
            for _ in range(images_per_camera):
                _save(draw(person, cams[cam], rng), folders["bounding_box_train"], pid, cam, frame)
                frame += 1
    for pid in range(train_ids + 1, train_ids + test_ids + 1):
        person = random_identity(rng)
        query_cams = rng.choice(cameras, size=2, replace=False)
        for cam in range(cameras):
            if cam in query_cams:
                _save(draw(person, cams[cam], rng), folders["query"], pid, cam, frame)
                frame += 1
            for _ in range(images_per_camera - 1):
                _save(draw(person, cams[cam], rng), folders["bounding_box_test"], pid, cam, frame)
                frame += 1
    for _ in range(distractors):
        _save(draw(random_identity(rng), cams[int(rng.integers(cameras))], rng), folders["bounding_box_test"], 0,
              int(rng.integers(cameras)), frame)
        frame += 1
    for _ in range(junk):  # junk: noise crops that the parsers must drop (pid -1)
        noise = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        _save(noise, folders["bounding_box_test"], -1, int(rng.integers(cameras)), frame)
        frame += 1
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="root folder (market1501/ is created inside)")
    parser.add_argument("--train-ids", type=int, default=32)
    parser.add_argument("--test-ids", type=int, default=24)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--images-per-camera", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=20)
    parser.add_argument("--junk", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate(args.out, train_ids=args.train_ids, test_ids=args.test_ids, cameras=args.cameras,
                    images_per_camera=args.images_per_camera, distractors=args.distractors, junk=args.junk,
                    seed=args.seed)
    print(f"Synthetic Market-1501-layout dataset written to {root}")


if __name__ == "__main__":
    main()
