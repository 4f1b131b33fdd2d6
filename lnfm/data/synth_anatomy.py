"""Site anatomy for the synthetic CT phantoms: a tissue map per site and the places nodes go.

Each site builder paints tissues (later layers overwrite earlier ones) on an open grid
of world millimetres in a site frame (RAS+: +x patient right, +y anterior, +z superior)
and returns node anchors: station names with a sampler that proposes a node centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np

# Tissue ids of the tissue map.
AIR, LUNG, FAT, MUSCLE, BONE, MARROW, ARTERY, VEIN, ORGAN, KIDNEY, WATER, THYROID, BOWEL, NODE, HILUM = range(15)
TISSUE_NAMES = ("air", "lung", "fat", "muscle", "bone", "marrow", "artery", "vein", "organ", "kidney",
                "water", "thyroid", "bowel", "node", "hilum")
# Tissues a node must not overlap (it sits in fat or against muscle, never inside these).
SOLID = (AIR, BONE, MARROW, ARTERY, VEIN, ORGAN, KIDNEY, WATER, THYROID, BOWEL, LUNG)


@dataclass
class Anchor:
    """A nodal station: `propose(rng, radius_mm)` returns a candidate centre (x, y, z) in mm."""

    station: str
    propose: Callable[[np.random.Generator, float], np.ndarray]


@dataclass
class Scene:
    tissue: np.ndarray  # uint8 (X, Y, Z) tissue ids
    anchors: list[Anchor] = field(default_factory=list)


class Painter:
    """Open-grid coordinates of the phantom and mask primitives over them."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x[:, None, None], y[None, :, None], z[None, None, :]
        self.shape = (x.size, y.size, z.size)
        self.zr = (float(z.min()), float(z.max()))
        self.tissue = np.full(self.shape, AIR, np.uint8)

    def paint(self, mask: np.ndarray, tid: int, where: np.ndarray | None = None) -> None:
        mask = np.broadcast_to(mask, self.shape)
        if where is not None:
            mask = mask & np.broadcast_to(where, self.shape)
        self.tissue[mask] = tid

    def ellipse(self, cx, cy, a, b, angle: float = 0.0, zlim=(-np.inf, np.inf)) -> np.ndarray:
        """Elliptic cylinder along z; centre may vary with z (pass arrays shaped like self.z)."""
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = c * dx + s * dy, -s * dx + c * dy
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        return inside & (self.z >= zlim[0]) & (self.z <= zlim[1])

    def ellipsoid(self, c, r) -> np.ndarray:
        return ((self.x - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2 + ((self.z - c[2]) / r[2]) ** 2 <= 1.0

    def tube_x(self, cy, cz, r: float) -> np.ndarray:
        """Tube running along x; cy, cz are functions of x (vessels crossing medio-laterally)."""
        return (self.y - cy(self.x)) ** 2 + (self.z - cz(self.x)) ** 2 <= r * r

    def shelled(self, cx, cy, a, b, angle, t, outer: int, inner: int, zlim=(-np.inf, np.inf)) -> None:
        """Paint an ellipse with a wall `t` mm thick (e.g. cortical bone around marrow)."""
        self.paint(self.ellipse(cx, cy, a, b, angle, zlim), outer)
        self.paint(self.ellipse(cx, cy, max(a - t, 0.5), max(b - t, 0.5), angle, zlim), inner)

    def bowel(self, rng: np.random.Generator, region: np.ndarray, n: int, r=(7.0, 16.0)) -> None:
        """Bowel loops: walled circles holding fluid or gas, placed inside `region`."""
        pts = np.argwhere(np.broadcast_to(region, self.shape)[:, :, self.shape[2] // 2])
        if len(pts) == 0:
            return
        xs, ys = self.x.ravel(), self.y.ravel()
        for _ in range(n):
            i, j = pts[rng.integers(len(pts))]
            rad = rng.uniform(*r)
            drift = rng.uniform(-0.4, 0.4, 2)
            cx, cy = xs[i] + drift[0] * self.z, ys[j] + drift[1] * self.z
            self.paint(self.ellipse(cx, cy, rad, rad * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)), BOWEL, region)
            content = AIR if rng.random() < 0.35 else WATER
            self.paint(self.ellipse(cx, cy, rad - 2.5, rad * 0.7 - 2.5, 0.0), content, region)

    def wobble(self, rng: np.random.Generator, amp: float = 3.0, period: float = 80.0) -> np.ndarray:
        """A smooth random sideways drift along z, so straight structures are not perfectly straight."""
        return amp * np.sin(2 * np.pi * self.z / period + rng.uniform(0, 2 * np.pi))


def beside(cx: Callable, cy: Callable, r: float, zr, angles=(0.0, 2 * np.pi), gap=(0.5, 4.0)):
    """Propose centres next to a vessel running along z (centre (cx(z), cy(z)), radius r). A station
    whose z limit lies beyond a short grid's end (zr reversed) proposes between the two; the placement
    rejects centres off the grid."""
    def propose(rng: np.random.Generator, radius: float) -> np.ndarray:
        z = rng.uniform(*sorted(zr))
        t = rng.uniform(*angles)
        d = r + radius + rng.uniform(*gap)
        return np.array([cx(z) + d * np.cos(t), cy(z) + d * np.sin(t), z])
    return propose


def in_box(a, b):
    """Propose centres uniformly in the box spanned by corners a and b."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)

    def propose(rng: np.random.Generator, radius: float) -> np.ndarray:
        return rng.uniform(lo, hi)
    return propose


def pelvis(p: Painter, rng: np.random.Generator) -> Scene:
    j = rng.normal(0, 1, 8)
    p.paint(p.ellipse(0, 0, 175 + 8 * j[0], 125 + 6 * j[1]), FAT)
    p.paint(p.ellipse(0, 0, 160 + 8 * j[0], 112 + 6 * j[1]) & ~p.ellipse(0, 0, 150 + 8 * j[0], 102 + 6 * j[1]), MUSCLE)
    for s in (1, -1):
        p.paint(p.ellipse(s * 95, -45, 26, 60, s * 0.75), MUSCLE)  # gluteal and iliacus muscles around the wing
        p.shelled(s * (92 + 2 * j[2]), -40, 14, 52, s * 0.7, 3.0, BONE, MARROW)  # iliac wing
        p.paint(p.ellipse(s * 45, -38 + 0.1 * p.z, 16, 15), MUSCLE)  # psoas
        p.paint(p.ellipse(s * 70, -15, 10, 30, s * 0.5), MUSCLE)  # obturator internus
    p.shelled(0, -88, 48, 20, 0.0, 3.0, BONE, MARROW)  # sacrum
    p.paint(p.ellipsoid((0, 55, -45 + 10 * j[4]), (45 + 5 * j[3], 35, 42)), WATER)  # bladder
    p.paint(p.ellipse(0, -58, 15, 13), BOWEL)  # rectum
    p.paint(p.ellipse(0, -58, 9, 7), AIR if j[5] > 0 else WATER)
    p.bowel(rng, (p.y > 10) & (p.y < 90) & (np.abs(p.x) < 70) & (p.z > 10), int(rng.integers(2, 6)))
    anchors = []
    for s, side in ((1, "right"), (-1, "left")):
        wa, wv = p.wobble(rng, 2.0), p.wobble(rng, 2.0)
        ax = lambda z, s=s: s * (52 + 0.12 * z)  # noqa: E731
        ay = lambda z: -8 + 0.15 * z  # noqa: E731
        p.paint(p.ellipse(ax(p.z) + wa, ay(p.z), 4.5, 4.5), ARTERY)  # external iliac artery
        p.paint(p.ellipse(ax(p.z) - s * 6 + wv, ay(p.z) - 9, 7, 5.5), VEIN)  # external iliac vein
        ix = lambda z, s=s: s * (34 + 0.08 * z)  # noqa: E731
        p.paint(p.ellipse(ix(p.z), -55, 3.5, 3.5), ARTERY)  # internal iliac artery
        p.paint(p.ellipse(ix(p.z) + s * 6, -60, 5, 4), VEIN)
        anchors += [
            Anchor(f"{side}_external_iliac", beside(ax, lambda z: ay(z) - 4, 10, p.zr)),
            Anchor(f"{side}_internal_iliac", beside(ix, lambda z: -57, 7, p.zr)),
            Anchor(f"{side}_obturator", in_box((s * 58, -40, p.zr[0]), (s * 45, -20, p.zr[1]))),
        ]
    anchors.append(Anchor("presacral", in_box((-20, -72, p.zr[0]), (20, -70, p.zr[1]))))
    return Scene(p.tissue, anchors)


def abdomen(p: Painter, rng: np.random.Generator) -> Scene:
    j = rng.normal(0, 1, 8)
    p.paint(p.ellipse(0, 10, 165 + 8 * j[0], 122 + 6 * j[1]), FAT)
    p.paint(p.ellipse(90 + 5 * j[2], 20, 85, 75, 0.3, (-20 + 10 * j[3], 400)), ORGAN)  # liver (patient right)
    for s in (1, -1):
        p.paint(p.ellipse(s * 32, -48, 14 + 0.05 * (p.z - p.zr[0]), 13), MUSCLE)  # psoas, thickening caudally
        p.paint(p.ellipse(s * 32, -95, 24, 18), MUSCLE)  # paraspinal
        kz = (-60 + 15 * j[4] + 10 * s, 60 + 15 * j[5])
        p.paint(p.ellipse(s * 78, -48, 30, 42, -s * 0.5, kz), KIDNEY)
        p.paint(p.ellipse(s * 66, -42, 8, 12, -s * 0.5, kz), FAT)  # renal sinus fat
    p.shelled(0, -52, 21, 18, 0.0, 2.0, BONE, MARROW)  # vertebral body
    p.paint(p.ellipse(0, -86, 10, 16), BONE)  # posterior elements
    p.paint(p.ellipse(0, -76, 7, 6), WATER)  # spinal canal
    p.bowel(rng, (p.y > 25) & (p.x < 60) & (np.abs(p.x) < 110), int(rng.integers(4, 9)))
    wa = p.wobble(rng, 1.5)
    ao = (lambda z: -16, lambda z: -22)
    p.paint(p.ellipse(ao[0](p.z) + wa, ao[1](p.z), 10.5, 10.5), ARTERY)  # aorta
    ivc = (lambda z: 22, lambda z: -20)
    p.paint(p.ellipse(ivc[0](p.z), ivc[1](p.z), 12, 8, 0.2), VEIN)
    sma = (lambda z: -8, lambda z: 10 + 0.25 * z)
    p.paint(p.ellipse(sma[0](p.z), sma[1](p.z), 3.5, 3.5), ARTERY)  # superior mesenteric artery
    p.paint(p.ellipse(sma[0](p.z) + 10, sma[1](p.z) + 2, 5, 5), VEIN)
    anchors = [
        Anchor("left_para_aortic", beside(*ao, 11, p.zr, (2.4, 3.9))),
        Anchor("aortocaval", in_box((-2, -40, p.zr[0]), (6, -10, p.zr[1]))),
        Anchor("right_paracaval", beside(*ivc, 12, p.zr, (-0.8, 0.8))),
        Anchor("superior_mesenteric", beside(*sma, 4, p.zr, (0.6, 2.6))),
    ]
    return Scene(p.tissue, anchors)


def mediastinum(p: Painter, rng: np.random.Generator) -> Scene:
    j = rng.normal(0, 1, 8)
    a, b = 150 + 8 * j[0], 108 + 5 * j[1]
    p.paint(p.ellipse(0, 0, a, b), FAT)
    p.paint(p.ellipse(0, 0, a * 0.93, b * 0.9), MUSCLE)  # chest wall
    ring = p.ellipse(0, 0, a * 0.9, b * 0.86) & ~p.ellipse(0, 0, a * 0.84, b * 0.78)
    phase = np.arctan2(p.y, p.x)
    ribs = np.cos(2 * np.pi * (p.z + 18 * np.abs(phase)) / 32.0 + j[2]) > 0.55  # oblique rib bands
    p.paint(ring & ribs, BONE)
    inside = p.ellipse(0, 0, a * 0.84, b * 0.78)
    p.paint(inside, LUNG)
    p.paint(p.ellipse(0, 10, 40 + 3 * j[3], 80) | p.ellipse(0, -70, 36, 32), FAT)  # mediastinal fat, paravertebral
    heart_z = -95 + 8 * j[4]  # the heart's centre lies below the carina; its dome reaches into the low slices
    p.paint(p.ellipsoid((-12, 22, heart_z), (62, 52, 62)) & inside, MUSCLE)  # myocardium
    p.paint(p.ellipsoid((-14, 24, heart_z), (52, 42, 54)) & inside, ARTERY)  # cardiac blood pool
    p.shelled(0, -75, 19, 17, 0.0, 2.0, BONE, MARROW)  # vertebral body
    p.paint(p.ellipse(0, -100, 7, 6), WATER)
    for s in (1, -1):
        p.paint(p.ellipse(s * 28, -100, 18, 14), MUSCLE)  # paraspinal
    p.shelled(0, b * 0.84, 17, 7, 0.0, 2.0, BONE, MARROW)  # sternum
    top = 30 + 6 * j[5]
    carina = -5 + 5 * j[6]
    p.paint(p.ellipse(2, -18, 11, 10, 0.0, (carina, 400)), MUSCLE)  # tracheal wall
    p.paint(p.ellipse(2, -18, 8.5, 7.5, 0.0, (carina, 400)), AIR)
    for s in (1, -1):
        bx = s * (6 + 0.7 * np.maximum(carina - p.z, 0))
        p.paint(p.ellipse(bx, -20, 7.5, 7, 0.0, (-400, carina)), MUSCLE)  # main bronchus
        p.paint(p.ellipse(bx, -20, 5, 4.5, 0.0, (-400, carina)), AIR)
    p.paint(p.ellipse(-6, -40, 7, 6), MUSCLE)  # oesophagus
    if j[7] > 0.5:
        p.paint(p.ellipse(-6, -40, 2, 1.5), AIR)
    desc = (lambda z: -24, lambda z: -52)
    p.paint(p.ellipse(desc[0](p.z), desc[1](p.z), 12, 12, 0.0, (-400, top)), ARTERY)
    asc = (lambda z: 10, lambda z: 22)
    p.paint(p.ellipse(asc[0](p.z), asc[1](p.z), 15, 15, 0.0, (-40, top)), ARTERY)
    # Aortic arch: a half ring joining ascending and descending aorta above `top`.
    rr = np.sqrt(((p.x + 7) / 17.0) ** 2 + ((p.y + 15) / 37.0) ** 2)
    p.paint((((rr - 1) * 27) ** 2 + (p.z - top - 8) ** 2 <= 12 ** 2) & (p.z > top - 5), ARTERY)
    p.paint(p.ellipse(-18, 30, 14, 14, 0.0, (-45, -8)), ARTERY)  # pulmonary trunk
    svc = (lambda z: 28, lambda z: 15)
    p.paint(p.ellipse(svc[0](p.z), svc[1](p.z), 9, 8, 0.0, (-40, 400)), VEIN)
    anchors = [
        Anchor("4R", beside(lambda z: 2, lambda z: -18, 11, (carina, top + 10), (-0.5, 0.9))),
        Anchor("4L", beside(lambda z: 2, lambda z: -18, 11, (carina, top + 10), (2.4, 3.5))),
        Anchor("7", in_box((-6, -34, carina - 30), (6, -24, carina - 8))),
        Anchor("6", in_box((-20, 40, -20), (20, 60, top + 10))),
        Anchor("8", beside(*desc, 12, p.zr, (0.3, 1.6))),
    ]
    return Scene(p.tissue, anchors)


def axilla(p: Painter, rng: np.random.Generator) -> Scene:
    """Right axilla: chest wall and lung medially (-x), the arm laterally (+x)."""
    j = rng.normal(0, 1, 6)
    arm = (115 + 6 * j[0], 5 * j[1])
    bridge_b = 75 * np.clip((p.z + 60 + 10 * j[2]) / 90.0, 0.4, 1.0)  # axillary soft tissue narrows caudally
    body = p.ellipse(-150, 0, 150, 110) | p.ellipse(*arm, 50, 48) | p.ellipse(-10, 0, 120, bridge_b)
    p.paint(body, FAT)
    p.paint(p.ellipse(*arm, 44, 42), MUSCLE)
    p.shelled(arm[0], arm[1], 13, 13, 0.0, 3.0, BONE, MARROW)  # humerus
    p.paint(p.ellipse(-150, 0, 138, 100), MUSCLE)  # chest wall
    ring = p.ellipse(-150, 0, 134, 96) & ~p.ellipse(-150, 0, 126, 88)
    p.paint(ring & (np.cos(2 * np.pi * (p.z + 0.3 * p.y) / 30.0 + j[3]) > 0.5), BONE)  # ribs
    p.paint(p.ellipse(-150, 0, 124, 86), LUNG)
    p.paint(p.ellipse(-10, 62, 85, 13, -0.15) & body, MUSCLE)  # pectoralis major
    p.paint(p.ellipse(-15, 40, 45, 8, -0.3) & body, MUSCLE)  # pectoralis minor
    p.paint(p.ellipse(10, -62, 80, 15, 0.2) & body, MUSCLE)  # latissimus / subscapularis
    p.paint(p.ellipse(-35, -72, 45, 5, 0.35) & body, BONE)  # scapula blade
    ay = lambda x: 18 + 0.1 * x  # noqa: E731
    az = lambda x: 8 + 0.25 * x + 4 * j[4]  # noqa: E731
    p.paint(p.tube_x(ay, az, 4.0) & body, ARTERY)  # axillary artery
    p.paint(p.tube_x(lambda x: ay(x) - 9, lambda x: az(x) - 4, 6.0) & body, VEIN)
    anchors = [
        Anchor("level_I", in_box((20, -35, p.zr[0] + 5), (60, 20, p.zr[1] - 5))),
        Anchor("level_II", in_box((-15, 0, -20), (20, 30, p.zr[1] - 5))),
        Anchor("level_III", in_box((-30, 10, 0), (-15, 35, p.zr[1] - 5))),
    ]
    return Scene(p.tissue, anchors)


def head_neck(p: Painter, rng: np.random.Generator) -> Scene:
    j = rng.normal(0, 1, 6)
    grow = 1 + 0.002 * p.z
    p.paint(p.ellipse(0, 0, (64 + 4 * j[0]) * grow, (58 + 3 * j[1]) * grow), FAT)
    p.paint(p.ellipse(0, -40, 52, 24), MUSCLE)  # posterior neck muscles
    p.paint(p.ellipse(0, -14, 28, 12), MUSCLE)  # prevertebral muscles
    p.shelled(0, -20, 14, 12, 0.0, 2.0, BONE, MARROW)  # vertebral body
    p.paint(p.ellipse(0, -40, 5, 12), BONE)  # spinous process
    p.paint(p.ellipse(0, -36, 7, 6), WATER)  # spinal canal
    mz = 25 + 6 * j[2]
    arc = p.ellipse(0, 18, 48, 42, 0.0, (mz, 400)) & ~p.ellipse(0, 18, 43, 37) & (p.y > 20)
    p.paint(arc, BONE)  # mandible
    p.paint(p.ellipse(0, 24, 13, 10), MUSCLE)  # larynx / pharynx wall
    p.paint(p.ellipse(0, 24, 9, 6.5), AIR)
    tz = -12 + 5 * j[3]
    for s in (1, -1):
        p.paint(p.ellipse(s * 16, 20, 8, 12, 0.0, (-400, tz)), THYROID)
        p.paint(p.ellipse(s * 30, 28, 11, 9, 0.0, (mz - 15, 400)), ORGAN)  # submandibular gland
        p.paint(p.ellipse(s * 44, 14, 8, 17, -s * 0.5), MUSCLE)  # sternocleidomastoid
    anchors = []
    for s, side in ((1, "right"), (-1, "left")):
        cx, jx = (lambda z, s=s: s * 22), (lambda z, s=s: s * 33)
        cy, jy = (lambda z: 4), (lambda z: 5)
        p.paint(p.ellipse(cx(p.z), cy(p.z), 4, 4), ARTERY)  # common carotid
        p.paint(p.ellipse(jx(p.z), jy(p.z), 6.5, 5), VEIN)  # internal jugular
        lat = (-0.6, 1.4) if s > 0 else (1.7, 3.7)
        anchors += [
            Anchor(f"{side}_level_IIA", beside(jx, jy, 6.5, (10, p.zr[1]), lat)),
            Anchor(f"{side}_level_III", beside(jx, jy, 6.5, (-15, 10), lat)),
            Anchor(f"{side}_level_IVA", beside(jx, jy, 6.5, (p.zr[0], -15), lat)),
            Anchor(f"{side}_level_IB", in_box((s * 30, 38, mz - 12), (s * 18, 45, p.zr[1]))),
        ]
    return Scene(p.tissue, anchors)


BUILDERS: dict[str, Callable[[Painter, np.random.Generator], Scene]] = {
    "head_neck": head_neck, "axilla": axilla, "mediastinum": mediastinum, "abdomen": abdomen, "pelvis": pelvis,
}
# Centre of the field of view in each site frame (the nodal region).
FOV_CENTRE = {"head_neck": (0.0, 5.0, 0.0), "axilla": (-5.0, 5.0, 0.0), "mediastinum": (0.0, 0.0, 0.0),
              "abdomen": (0.0, -15.0, 0.0), "pelvis": (0.0, -20.0, 0.0)}
