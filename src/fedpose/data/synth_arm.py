"""synth-arm: a generated stand-in for the paper's single-arm rehabilitation set.

One subject (torso, head, a passive left arm and the annotated right arm) with a rehabilitation
robot attached to the right forearm, seen by four fixed cameras: anterior, posterior, left lateral
and right lateral. Two posture families: "upright" (arm hanging, small variations) and "extended"
(arm raised forward or sideways, varied shoulder and elbow angles). Every image is a pure function
of (seed, index), so the same seed gives byte-identical files.

The scene is 3D: body parts are ellipsoids, tapered capsules and bars, projected with a pinhole
camera and drawn far-to-near (painter's algorithm) with Pillow. The same drawing order fills an
id buffer, which tells whether the body or the robot covers a keypoint.

World frame: metres, x = the subject's left, y = up (0 at the hips), z = the subject's front.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedpose.files import write_atomically

VIEWS = ("anterior", "posterior", "left", "right")
KEYPOINTS = ("shoulder", "elbow", "wrist")
# camera azimuth in degrees around the vertical axis: 0 = in front, 90 = at the subject's left
_AZIMUTH = {"anterior": 0.0, "left": 90.0, "posterior": 180.0, "right": 270.0}
# where the subject looks in the picture, for partitioners that split by facing direction
_FACING = {"anterior": "toward", "posterior": "away", "left": "image-left", "right": "image-right"}
_EXTENDED_SHARE = 0.6

_SS = 2  # draw at twice the size and box-downsample: cheap antialiasing
_BG, _ARM, _BODY, _ROBOT = 0, 1, 2, 3  # owners in the id buffer

# --- the subject (fixed: one person) ---------------------------------------------------------
_SHOULDER = {-1: np.array([-0.185, 0.455, 0.0]), 1: np.array([0.185, 0.455, 0.0])}
_UPPER, _FORE, _HAND = 0.29, 0.255, 0.085
# shirt cross-sections bottom to top: (height, half width, half depth)
_SHIRT_RINGS = (
    (-0.04, 0.158, 0.105),
    (0.14, 0.14, 0.094),
    (0.32, 0.162, 0.108),
    (0.43, 0.168, 0.098),
    (0.505, 0.115, 0.07),
)
_PANTS_RINGS = ((-0.6, 0.16, 0.1), (-0.02, 0.155, 0.1))
_HEAD_C = np.array([0.0, 0.685, 0.012])
_HEAD_R = np.array([0.083, 0.106, 0.094])
_SKIN = (222, 172, 140)
_HAIR = (62, 44, 32)
_SHIRTS = ((58, 92, 160), (165, 52, 55), (68, 128, 92), (196, 198, 204), (52, 52, 60))
_PANTS = ((48, 52, 68), (150, 132, 100), (40, 40, 44))
# each fixed camera sees its own wall of the room
_WALLS = {
    "anterior": (214, 204, 186),
    "posterior": (186, 198, 212),
    "left": (196, 210, 192),
    "right": (226, 222, 216),
}
_FLOORS = {
    "anterior": (142, 118, 96),
    "posterior": (120, 122, 128),
    "left": (132, 120, 100),
    "right": (150, 140, 126),
}
# a fixed lamp in the room: the back is darker than the front, so views also differ in shading
_LIGHT = np.array([-0.35, 0.8, 0.5]) / np.linalg.norm([-0.35, 0.8, 0.5])

# --- the robot: a two-link arm on a pedestal at the subject's right front -------------------
_ROBOT_BASE = np.array([-0.6, 0.08, 0.36])
_ROBOT_LINKS = (0.5, 0.52)
_METAL = (150, 154, 160)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of v about a unit axis."""
    c, s = math.cos(angle), math.sin(angle)
    return v * c + np.cross(axis, v) * s + axis * float(np.dot(axis, v)) * (1 - c)


def _fib_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    y = 1 - 2 * i / n
    r = np.sqrt(1 - y * y)
    phi = i * math.pi * (3 - math.sqrt(5))
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)


_SPHERE = _fib_sphere(180)
_RING = np.stack(
    [
        np.cos(np.linspace(0, 2 * np.pi, 20, endpoint=False)),
        np.sin(np.linspace(0, 2 * np.pi, 20, endpoint=False)),
    ],
    axis=1,
)


def _hull(pts: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2D points, as a polygon for ImageDraw."""
    p = sorted(set(map(tuple, np.round(pts, 2).tolist())))
    if len(p) < 3:
        return p

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    upper: list = []
    for q in p:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    for q in reversed(p):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return lower[:-1] + upper[:-1]


def _tone(rgb, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * k)))) for c in rgb)


# --- camera ----------------------------------------------------------------------------------
@dataclass
class _Camera:
    pos: np.ndarray
    right: np.ndarray
    up: np.ndarray
    fwd: np.ndarray
    focal: float
    cx: float
    cy: float

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = np.atleast_2d(pts) - self.pos
        z = rel @ self.fwd
        u = self.cx + self.focal * (rel @ self.right) / z
        v = self.cy - self.focal * (rel @ self.up) / z
        return np.stack([u, v], axis=1), z

    def to_cam(self, p: np.ndarray) -> np.ndarray:
        return _unit(self.pos - p)

    def light2d(self) -> np.ndarray:
        """Direction in the image towards the lamp: the lit side of every limb."""
        d = np.array([_LIGHT @ self.right, -(_LIGHT @ self.up)])
        return d / max(float(np.linalg.norm(d)), 1e-6)


def _make_camera(view: str, size: int, rng: np.random.Generator) -> tuple[_Camera, float]:
    az = _AZIMUTH[view] + rng.uniform(-5, 5)
    elev = math.radians(4 + rng.uniform(-3, 3))
    roll = math.radians(rng.uniform(-3, 3))
    dist = 3.2
    target = np.array([0.0, 0.4, 0.0]) + rng.uniform(-0.03, 0.03, 3)
    a = math.radians(az)
    pos = target + dist * np.array(
        [math.cos(elev) * math.sin(a), math.sin(elev), math.cos(elev) * math.cos(a)]
    )
    fwd = _unit(target - pos)
    right = _unit(np.cross(fwd, [0.0, 1.0, 0.0]))
    up = np.cross(right, fwd)
    right, up = (
        math.cos(roll) * right + math.sin(roll) * up,
        -math.sin(roll) * right + math.cos(roll) * up,
    )
    side = size * _SS
    half_field = 0.72 / rng.uniform(0.92, 1.08)  # metres seen from the centre to the edge
    focal = (side / 2) * dist / half_field
    cx = side / 2 + rng.uniform(-0.04, 0.04) * side
    cy = side / 2 + rng.uniform(-0.04, 0.04) * side
    return _Camera(pos, right, up, fwd, focal, cx, cy), az % 360


# --- posture ---------------------------------------------------------------------------------
def _arm_directions(elev: float, plane: float, flex: float, rot: float, side: int):
    """Unit directions of the upper arm and forearm.

    elev: angle from hanging straight down; plane: 0 = raise forward, 90 = raise sideways;
    flex: elbow flexion; rot: humeral rotation (turns the plane the elbow bends in). Degrees.
    side: -1 for the right arm (outward is -x), +1 for the left.
    """
    e, p = math.radians(elev), math.radians(plane)
    u = np.array([side * math.sin(e) * math.sin(p), -math.cos(e), math.sin(e) * math.cos(p)])
    down = np.array([0.0, -1.0, 0.0])
    axis = np.cross(down, u)
    # the elbow bends towards the body's front carried along by the shoulder's rotation, so a
    # forward-raised arm bends upwards and a sideways-raised arm bends forwards, as in a person
    bend = np.array([0.0, 0.0, 1.0])
    if np.linalg.norm(axis) > 1e-6:
        bend = _rotate(bend, _unit(axis), e)
    bend = _rotate(bend, u, math.radians(rot) * -side)
    f = math.radians(flex)
    return u, _unit(math.cos(f) * u + math.sin(f) * bend)


def _inside_body(p: np.ndarray) -> bool:
    torso = -0.6 < p[1] < 0.56 and (p[0] / 0.2) ** 2 + (p[2] / 0.14) ** 2 < 1
    head = np.linalg.norm((p - _HEAD_C) / (_HEAD_R + 0.05)) < 1
    return bool(torso or head)


def _arm_chain(side: int, angles: tuple, hand_bend: np.ndarray):
    u, v = _arm_directions(*angles, side)
    s = _SHOULDER[side]
    e = s + _UPPER * u
    w = e + _FORE * v
    h = _unit(v + hand_bend)
    return s, e, w, w + _HAND * h


def _sample_posture(posture: str, rng: np.random.Generator):
    """Joint positions of both arms; resampled until no hand or elbow passes through the body."""
    for _ in range(100):
        if posture == "upright":
            angles = (
                rng.uniform(3, 14),
                rng.uniform(20, 160),
                rng.uniform(0, 25),
                rng.uniform(-20, 20),
            )
        else:
            angles = (
                rng.uniform(35, 130),
                rng.uniform(-15, 100),
                rng.uniform(0, 110),
                rng.uniform(-40, 30),
            )
        right = _arm_chain(-1, angles, rng.normal(0, 0.15, 3))
        left = _arm_chain(
            1,
            (rng.uniform(4, 12), rng.uniform(40, 140), rng.uniform(0, 20), rng.uniform(-15, 15)),
            rng.normal(0, 0.1, 3),
        )
        probes = [right[1], right[2], right[3], (right[1] + right[2]) / 2]
        if not any(_inside_body(p) for p in probes):
            return right, left, angles
    return right, left, angles


def _robot_elbow(base: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Two-link inverse kinematics: the robot's joint, bent up and outwards."""
    l1, l2 = _ROBOT_LINKS
    d_vec = target - base
    d = float(np.clip(np.linalg.norm(d_vec), abs(l1 - l2) + 1e-3, l1 + l2 - 1e-3))
    e = _unit(d_vec)
    a = (l1 * l1 - l2 * l2 + d * d) / (2 * d)
    h = math.sqrt(max(l1 * l1 - a * a, 0.0))
    pref = np.array([-0.5, 1.0, 0.2])
    perp = _unit(pref - (pref @ e) * e)
    return base + a * e + h * perp


# --- primitives ------------------------------------------------------------------------------
@dataclass
class _Prim:
    depth: float
    owner: int
    shapes: list = field(default_factory=list)  # (kind, coords, rgb); the first is the silhouette
    silhouette: int = 1  # how many leading shapes make up the id-buffer mask


def _capsule_polys(a, b, ra, rb):
    """A tapered limb as one quad and two end discs."""
    d = b - a
    n = float(np.hypot(*d))
    shapes = []
    if n > 1e-6:
        perp = np.array([-d[1], d[0]]) / n
        quad = [
            tuple(a + perp * ra),
            tuple(b + perp * rb),
            tuple(b - perp * rb),
            tuple(a - perp * ra),
        ]
        shapes.append(("poly", quad))
    shapes.append(("ellipse", (a[0] - ra, a[1] - ra, a[0] + ra, a[1] + ra)))
    shapes.append(("ellipse", (b[0] - rb, b[1] - rb, b[0] + rb, b[1] + rb)))
    return shapes


# (radius share, shift towards the light as a share of the radius, brightness)
_BANDS = ((1.0, 0.0, 0.7), (0.8, 0.16, 0.9), (0.5, 0.32, 1.04), (0.2, 0.5, 1.14))


def _capsule(cam: _Camera, p0, p1, r0, r1, rgb, owner, bias=0.0, light=1.0) -> _Prim:
    uv, z = cam.project(np.stack([p0, p1]))
    ra, rb = cam.focal * r0 / z[0], cam.focal * r1 / z[1]
    d = uv[1] - uv[0]
    perp = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6)
    l2 = cam.light2d()
    # a limb seen end-on shades like a ball, towards the light itself
    lit = perp * math.copysign(1, perp @ l2) if np.hypot(*d) > 0.5 * (ra + rb) else l2
    prim = _Prim(float(z.mean()) + bias, owner)
    for k, (share, shift, bright) in enumerate(_BANDS):
        shapes = _capsule_polys(
            uv[0] + lit * shift * ra, uv[1] + lit * shift * rb, share * ra, share * rb
        )
        if k == 0:
            prim.silhouette = len(shapes)
        prim.shapes += [(kind, xy, _tone(rgb, bright * light)) for kind, xy in shapes]
    return prim


def _ball(cam: _Camera, c, r, rgb, owner, bias=0.0, light=1.0) -> _Prim:
    uv, z = cam.project(c)
    rp = cam.focal * r / z[0]
    l2 = cam.light2d()
    prim = _Prim(float(z[0]) + bias, owner)
    for share, shift, bright in _BANDS:
        x, y = uv[0] + l2 * shift * rp
        s = share * rp
        prim.shapes.append(("ellipse", (x - s, y - s, x + s, y + s), _tone(rgb, bright * light)))
    return prim


def _bar(cam: _Camera, p0, p1, width, rgb, owner, bias=0.0) -> _Prim:
    """A rectangular metal bar: flat faces, a bright edge stripe."""
    uv, z = cam.project(np.stack([p0, p1]))
    w0, w1 = cam.focal * width / 2 / z[0], cam.focal * width / 2 / z[1]
    d = uv[1] - uv[0]
    perp = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6)
    if perp @ cam.light2d() < 0:
        perp = -perp
    prim = _Prim(float(z.mean()) + bias, owner)
    for lo, hi, bright in ((-1, 1, 0.62), (-0.8, 0.8, 0.85), (0.2, 0.7, 1.25)):
        quad = [
            tuple(uv[0] + perp * w0 * hi),
            tuple(uv[1] + perp * w1 * hi),
            tuple(uv[1] + perp * w1 * lo),
            tuple(uv[0] + perp * w0 * lo),
        ]
        prim.shapes.append(("poly", quad, _tone(rgb, bright)))
    return prim


def _rings(rings) -> np.ndarray:
    return np.concatenate(
        [
            np.stack([a * _RING[:, 0], np.full(len(_RING), y), b * _RING[:, 1]], axis=1)
            for y, a, b in rings
        ]
    )


_SHIRT_PTS = _rings(_SHIRT_RINGS)
_PANTS_PTS = _rings(_PANTS_RINGS)


def _blob(cam: _Camera, pts3d: np.ndarray, rgb, owner, bias=0.0, light=1.0) -> _Prim:
    """A convex body (torso, head): its projected hull, shaded by shrinking towards the light."""
    uv, z = cam.project(pts3d)
    centre = uv.mean(axis=0)
    radius = float(np.sqrt(((uv - centre) ** 2).sum(axis=1).mean()))
    l2 = cam.light2d()
    prim = _Prim(float(cam.project(pts3d.mean(axis=0))[1][0]) + bias, owner)
    # shrinking and shifting is affine: the hull of the moved points is the moved hull
    hull = np.asarray(_hull(uv))
    for share, shift, bright in (
        (1.0, 0.0, 0.72),
        (0.85, 0.1, 0.88),
        (0.6, 0.22, 1.0),
        (0.3, 0.36, 1.1),
    ):
        pts = centre + (hull - centre) * share + l2 * shift * radius
        prim.shapes.append(("poly", [tuple(p) for p in pts.tolist()], _tone(rgb, bright * light)))
    return prim


def _facing_light(normal: np.ndarray) -> float:
    """How brightly a surface facing `normal` is lit."""
    return 0.78 + 0.3 * max(0.0, float(normal @ _LIGHT))


def _head(cam: _Camera, skin, light: float) -> list[_Prim]:
    to_cam = cam.to_cam(_HEAD_C)
    pts = _HEAD_C + _SPHERE * _HEAD_R
    head = _blob(cam, pts, skin, _BODY, light=light)
    # hair: the visible part of a cap over the top and back of the skull
    hair_dir = _unit(np.array([0.0, 0.8, -0.6]))
    cap = (_SPHERE @ hair_dir > 0.17) & (_SPHERE @ to_cam > -0.02)
    if cap.sum() >= 3:
        uv, _ = cam.project(_HEAD_C + _SPHERE[cap] * (_HEAD_R * 1.04))
        head.shapes.append(("poly", _hull(uv), _tone(_HAIR, light)))
    # face details only where they turn towards the camera
    for n, r, rgb in (
        (np.array([0.38, 0.12, 0.92]), 0.011, (40, 30, 30)),
        (np.array([-0.38, 0.12, 0.92]), 0.011, (40, 30, 30)),
        (np.array([0.0, -0.1, 1.0]), 0.017, _tone(skin, 0.92)),
        (np.array([0.0, -0.5, 0.87]), 0.012, (150, 70, 70)),
    ):
        n = _unit(n)
        if n @ to_cam > 0.25:
            c = _HEAD_C + n * _HEAD_R * 1.02
            uv, z = cam.project(c)
            rp = cam.focal * r / z[0]
            x, y = uv[0]
            head.shapes.append(
                ("ellipse", (x - rp, y - rp * 0.8, x + rp, y + rp * 0.8), _tone(rgb, light))
            )
    return [head]


def _torso(cam: _Camera, shirt, pants, skin, light: float) -> list[_Prim]:
    front = np.array([0.0, 0.0, 1.0])
    to_cam = cam.to_cam(np.array([0.0, 0.3, 0.0]))
    body = _blob(cam, _SHIRT_PTS, shirt, _BODY, light=light)
    # a V-neck shows the chest only from the front
    if front @ to_cam > 0.2:
        vneck = np.array([[-0.05, 0.505, 0.07], [0.05, 0.505, 0.07], [0.0, 0.43, 0.1]])
        uv, _ = cam.project(vneck)
        body.shapes.append(("poly", [tuple(p) for p in uv], _tone(skin, light)))
    elif front @ to_cam < -0.2:
        # a collar seam across the back
        seam = np.array([[-0.1, 0.49, -0.075], [0.1, 0.49, -0.075]])
        uv, _ = cam.project(seam)
        body.shapes.append(("line", [tuple(p) for p in uv], _tone(shirt, 0.55 * light)))
    legs = _blob(cam, _PANTS_PTS, pants, _BODY, bias=0.002, light=light)
    neck = _capsule(
        cam,
        np.array([0.0, 0.47, -0.005]),
        np.array([0.0, 0.615, 0.005]),
        0.043,
        0.04,
        skin,
        _BODY,
        bias=0.05,
        light=light,
    )
    return [body, legs, neck]


def _arm(cam: _Camera, chain, shirt, skin, owner, light) -> list[_Prim]:
    s, e, w, tip = chain
    sleeve_end = s + 0.5 * (e - s)
    # arms win depth ties with the torso: they hang beside it, not inside it
    upper = _capsule(cam, s, e, 0.047, 0.039, skin, owner, bias=-0.03, light=light)
    sleeve = _capsule(cam, s, sleeve_end, 0.058, 0.053, shirt, owner, light=light)
    deltoid = _ball(cam, s, 0.058, shirt, owner, light=light)
    # the upper arm, its sleeve and the shoulder cap are one piece for the painter
    upper.shapes = deltoid.shapes + upper.shapes + sleeve.shapes
    upper.silhouette = len(deltoid.shapes) + upper.silhouette
    fore = _capsule(cam, e, w, 0.037, 0.029, skin, owner, bias=-0.03, light=light)
    hand = _capsule(cam, w, tip, 0.03, 0.026, _tone(skin, 0.97), owner, bias=-0.03, light=light)
    return [upper, fore, hand]


def _robot(cam: _Camera, chain, rng: np.random.Generator) -> list[_Prim]:
    s, e, w, _ = chain
    base = _ROBOT_BASE + rng.uniform(-0.02, 0.02, 3)
    cuff0, cuff1 = e + 0.42 * (w - e), e + 0.7 * (w - e)
    grip = (cuff0 + cuff1) / 2
    joint = _robot_elbow(base, grip)
    metal = _tone(_METAL, rng.uniform(0.9, 1.1))
    return [
        _capsule(cam, cuff0, cuff1, 0.05, 0.05, (60, 70, 92), _ROBOT, bias=-0.06),
        _bar(cam, joint, grip, 0.045, metal, _ROBOT),
        _ball(cam, joint, 0.038, _tone(metal, 0.8), _ROBOT, bias=-0.02),
        _bar(cam, base, joint, 0.05, metal, _ROBOT),
        _ball(cam, base, 0.045, _tone(metal, 0.75), _ROBOT, bias=-0.02),
        _bar(cam, base - np.array([0.0, 0.7, 0.0]), base, 0.08, _tone(metal, 0.7), _ROBOT),
    ]


# --- one image -------------------------------------------------------------------------------
def _background(view: str, side: int, rng: np.random.Generator) -> Image.Image:
    wall = np.array(_WALLS[view], float) * rng.uniform(0.88, 1.1, 3)
    floor = np.array(_FLOORS[view], float) * rng.uniform(0.85, 1.12, 3)
    horizon = int(side * rng.uniform(0.76, 0.9))
    rows = np.linspace(1.08, 0.9, side)[:, None] * wall
    rows[horizon:] = np.linspace(0.85, 1.05, side - horizon)[:, None] * floor
    img = Image.fromarray(np.repeat(rows[:, None, :], side, axis=1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # furniture and a door or window: fixed per camera (it is one room), slightly shifted
    layout = {
        "anterior": [(0.02, 0.2, 0.2, 0.78, (120, 90, 70))],
        "posterior": [
            (0.74, 0.35, 0.97, 0.8, (90, 96, 110)),
            (0.05, 0.12, 0.25, 0.4, (235, 240, 245)),
        ],
        "left": [(0.7, 0.15, 0.9, 0.78, (140, 110, 80))],
        "right": [
            (0.08, 0.1, 0.35, 0.45, (210, 230, 245)),
            (0.75, 0.5, 0.98, 0.8, (110, 110, 100)),
        ],
    }[view]
    for x0, y0, x1, y1, rgb in layout:
        dx, dy = rng.uniform(-0.04, 0.04, 2)
        box = [(x0 + dx) * side, (y0 + dy) * side, (x1 + dx) * side, (y1 + dy) * side]
        tone = _tone(rgb, rng.uniform(0.85, 1.1))
        draw.rectangle(box, fill=tone, outline=_tone(tone, 0.7), width=max(1, side // 100))
    return img


def _draw(draw: ImageDraw.ImageDraw, kind: str, xy, fill) -> None:
    if kind == "poly":
        if len(xy) >= 3:
            draw.polygon(xy, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    else:
        draw.line(xy, fill=fill, width=2)


def _render(index: int, seed: int, size: int) -> tuple[Image.Image, dict]:
    rng = np.random.default_rng([seed, index])
    view = VIEWS[index % len(VIEWS)]  # interleaved: every slice of the set holds all views
    posture = "extended" if rng.random() < _EXTENDED_SHARE else "upright"
    cam, yaw = _make_camera(view, size, rng)
    right, left, angles = _sample_posture(posture, rng)

    shirt = _tone(_SHIRTS[rng.integers(len(_SHIRTS))], rng.uniform(0.9, 1.1))
    pants = _tone(_PANTS[rng.integers(len(_PANTS))], rng.uniform(0.9, 1.1))
    skin = _tone(_SKIN, rng.uniform(0.9, 1.08))
    side = size * _SS
    # the side of the body that faces this camera sets how brightly the whole figure is lit
    to_cam = cam.to_cam(np.array([0.0, 0.4, 0.0]))
    light = _facing_light(_unit(np.array([to_cam[0], 0.0, to_cam[2]])))
    prims = _torso(cam, shirt, pants, skin, light)
    prims += _head(cam, skin, light)
    for sgn in (-1, 1):
        ear = _HEAD_C + np.array([sgn * _HEAD_R[0], -0.01, -0.005])
        prims.append(_ball(cam, ear, 0.022, _tone(skin, 0.95), _BODY, bias=0.004, light=light))
    prims += _arm(cam, right, shirt, skin, _ARM, light)
    prims += _arm(cam, left, shirt, skin, _BODY, light)
    prims += _robot(cam, right, rng)

    img = _background(view, side, rng)
    ids = Image.new("L", (side, side), _BG)
    draw, idraw = ImageDraw.Draw(img), ImageDraw.Draw(ids)
    # far to near; the sort is stable, so ties keep the scene's listing order
    for prim in sorted(prims, key=lambda p: -p.depth):
        for k, (kind, xy, rgb) in enumerate(prim.shapes):
            _draw(draw, kind, xy, rgb)
            if k < prim.silhouette:
                _draw(idraw, kind, xy, prim.owner)

    joints3d = np.stack(right[:3])
    uv, _ = cam.project(joints3d)
    id_arr = np.asarray(ids)
    keypoints, occluded = [], []
    for x, y in uv:
        if not (0 <= x < side and 0 <= y < side):
            keypoints.append((0.0, 0.0, 0))
            occluded.append(0)
            continue
        covered = int(id_arr[int(y), int(x)] in (_BODY, _ROBOT))
        # Pillow's coordinates put pixel i's centre at i + 0.5; records put it at i. The clip
        # moves a joint in the outermost half pixel onto the last pixel centre.
        kx, ky = (min(max(c / _SS - 0.5, 0.0), size - 1.0) for c in (x, y))
        keypoints.append((kx, ky, 1 if covered else 2))
        occluded.append(covered)

    person = (id_arr == _ARM) | (id_arr == _BODY)
    ys, xs = np.nonzero(person)
    if len(xs) == 0:  # cannot happen with the fixed framing; keeps the box valid regardless
        xs = ys = np.array([0, side - 1])
    x0, x1 = xs.min() / _SS, (xs.max() + 1) / _SS
    y0, y1 = ys.min() / _SS, (ys.max() + 1) / _SS
    for x, y, v in keypoints:
        if v:
            x0, x1, y0, y1 = min(x0, x), max(x1, x), min(y0, y), max(y1, y)

    img = img.reduce(_SS)
    img = _photometric(img, rng)
    meta = {
        "view": view,
        "posture": posture,
        "facing": _FACING[view],
        "yaw": round(float(yaw), 1),
        "occluded": occluded,
        "shoulder_angles": [round(float(a), 1) for a in angles],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float(person.sum()) / _SS**2,
        "keypoints": keypoints,
    }
    return img, meta


def _photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting, white balance, sensor noise and a little blur: the same room on different days."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.93, 1.07, 3)
    arr = arr * gain + rng.normal(0, rng.uniform(2, 7), arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


# --- the dataset -----------------------------------------------------------------------------
def _r(x: float) -> float:
    return round(float(x), 2)


def _render_and_save(job: tuple[int, int, int, str]) -> dict:
    """Render image i, write its PNG, return its annotation. Top level: workers pickle it."""
    i, seed, size, image_dir = job
    img, meta = _render(i, seed, size)
    write_atomically(
        Path(image_dir) / f"{i:06d}.png",
        lambda tmp: img.save(tmp, format="PNG", compress_level=6),
    )
    flat = [v for x, y, vis in meta["keypoints"] for v in (_r(x), _r(y), vis)]
    return {
        "id": i + 1,
        "image_id": i + 1,
        "category_id": 1,
        "keypoints": flat,
        "num_keypoints": sum(1 for *_, v in meta["keypoints"] if v),
        "bbox": [_r(b) for b in meta["bbox"]],
        "area": _r(meta["area"]),
        "iscrowd": 0,
        "attributes": {
            k: meta[k] for k in ("view", "posture", "facing", "yaw", "occluded", "shoulder_angles")
        },
    }


def generate_synth_arm(
    out_dir: str | Path,
    n: int = 2060,
    seed: int = 0,
    size: int = 128,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Render n images into out_dir/images/ and write out_dir/annotations.json (COCO keypoints).

    Views are interleaved (image i has view VIEWS[i % 4]), so they are balanced to within one.
    Keypoints are 0-based pixel centres (pixel i spans i - 0.5 .. i + 0.5); bbox is the pixel
    span of the visible person (torso, head, arms; not the robot) and its labelled joints.
    Keypoint flags follow COCO: 2 = visible, 1 = labelled but covered by the torso, the other
    arm, the head or the robot, 0 = outside the image (then x = y = 0). attributes.occluded repeats
    the covered flag per joint; attributes also hold view, posture, facing, the camera yaw in
    degrees and the target arm's (elevation, plane, elbow flexion, rotation) angles.

    workers: processes to render with (0 = one per CPU, at most 8). Every image depends only on
    (seed, index), so the files are the same for any number of workers. The default is 1: the
    full set takes about half a minute on one core, and a process pool only pays off on an
    otherwise idle machine.
    """
    if n < 1 or size < 16:
        raise ValueError(f"synth-arm needs n >= 1 and size >= 16, got n={n}, size={size}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if workers <= 0:
        workers = min(os.cpu_count() or 1, 8)
    workers = min(workers, max(1, n // 64))
    jobs = [(i, seed, size, str(image_dir)) for i in range(n)]

    with contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn, not fork: the caller may hold torch threads, which fork does not carry safely
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            )
            results = pool.map(_render_and_save, jobs, chunksize=32)
        else:
            results = map(_render_and_save, jobs)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            bar = stack.enter_context(
                Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                )
            )
            task = bar.add_task(f"synth-arm {size}px", total=n)
        annotations = []
        for ann in results:  # map keeps the input order
            annotations.append(ann)
            if progress:
                bar.advance(task)
    images = [
        {"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size} for i in range(n)
    ]

    coco = {
        "info": {
            "description": "synth-arm: generated single-arm rehabilitation set",
            "seed": seed,
            "size": size,
            "count": n,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(KEYPOINTS),
                "skeleton": [[1, 2], [2, 3]],
            }
        ],
    }
    ann_file = out_dir / "annotations.json"
    # written last: a reader that finds the annotations finds every image complete
    write_atomically(ann_file, lambda tmp: tmp.write_text(json.dumps(coco, separators=(",", ":"))))
    return ann_file


# --- preview ---------------------------------------------------------------------------------
_JOINT_COLOURS = ((255, 60, 60), (60, 220, 60), (60, 140, 255))


def preview_grid(
    ann_file: str | Path, out_png: str | Path, per_view: int = 4, tile: int = 192
) -> Path:
    """A grid with one row per view: the first `per_view` images of each, keypoints drawn.

    Filled dots are visible joints, rings are labelled joints hidden behind the body or robot.
    """
    ann_file = Path(ann_file)
    coco = json.loads(ann_file.read_text())
    image_dir = ann_file.parent / "images"
    by_id = {im["id"]: im for im in coco["images"]}
    rows: dict[str, list] = defaultdict(list)
    for ann in coco["annotations"]:
        view = ann.get("attributes", {}).get("view", "?")
        if len(rows[view]) < per_view:
            rows[view].append(ann)
    views = [v for v in VIEWS if v in rows] + sorted(v for v in rows if v not in VIEWS)
    label_w = 90
    grid = Image.new("RGB", (label_w + per_view * tile, len(views) * tile), (255, 255, 255))
    gd = ImageDraw.Draw(grid)
    for r, view in enumerate(views):
        gd.text((6, r * tile + tile // 2 - 6), view, fill=(0, 0, 0))
        for c, ann in enumerate(rows[view]):
            info = by_id[ann["image_id"]]
            im = Image.open(image_dir / info["file_name"]).convert("RGB")
            k = tile / max(info["width"], info["height"])
            im = im.resize((round(info["width"] * k), round(info["height"] * k)), Image.LANCZOS)
            d = ImageDraw.Draw(im)
            kp = np.asarray(ann["keypoints"], float).reshape(-1, 3)
            for a, b in coco["categories"][0]["skeleton"]:
                pa, pb = kp[a - 1], kp[b - 1]
                if pa[2] > 0 and pb[2] > 0:
                    d.line(
                        [(pa[0] * k, pa[1] * k), (pb[0] * k, pb[1] * k)],
                        fill=(255, 230, 0),
                        width=3,
                    )
            for j, (x, y, v) in enumerate(kp):
                if v > 0:
                    box = (x * k - 5, y * k - 5, x * k + 5, y * k + 5)
                    fill = _JOINT_COLOURS[j % 3] if v == 2 else None
                    d.ellipse(box, fill=fill, outline=_JOINT_COLOURS[j % 3], width=2)
            attrs = ann.get("attributes", {})
            d.text(
                (4, 4),
                str(attrs.get("posture", "")),
                fill=(255, 255, 255),
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
            grid.paste(im, (label_w + c * tile, r * tile))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the committed preview small; it is for looking at, not training
    grid.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out_png, optimize=True
    )
    return out_png
