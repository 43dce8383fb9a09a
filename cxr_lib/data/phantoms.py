"""Synthetic chest X-ray phantoms, so every chapter runs (and every test passes) without real data.

A phantom is drawn procedurally on a coordinate grid at the output size: soft tissue, two lungs,
mediastinum and heart, diaphragm domes, ribs, clavicles, spine, lung vessels, then film blur,
noise and exposure. Each of the 14 ChestX-ray14 findings has a drawing where it belongs, with
random size, place and intensity, so the labels are learnable but not trivially so: a model has
to find a local pattern on top of anatomy, pose and exposure that vary from image to image.

Labels are 1 or 0, never NaN: a phantom is known to show exactly the findings drawn into it, so
a finding it does not show (including one the config never draws) is known to be absent.

Seeds carry the patient: seeds that agree above their low `VISIT_BITS` bits share anatomy (one
patient's follow-ups); pose, exposure, noise and the findings' drawings come from the whole seed.
This is what makes patient-level splits matter on phantoms as they do on real data.

Coordinates are canonical: x to the image right, y down, the chest spanning about [-0.9, 0.9].
Image left is the patient's right (PA view), so the heart bulges to the image right. Densities
add up like X-ray attenuation: brighter is denser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from cxr_lib.data.core import FINDINGS, DataError, XrayDataset
from cxr_lib.data.splits import patient_split

SOURCE = "phantom"
VISIT_BITS = 4  # up to 16 images per patient share one anatomy
_PATIENT_BITS = 24  # patients per data-set seed, so seeds of different data sets never collide
MIN_SIZE = 16  # pixels: the smallest phantom whose anatomy and findings can be drawn

# Relative frequencies follow ChestX-ray14 (Infiltration, Effusion, Atelectasis most common;
# Hernia, the rarest there, among the rarest here) but are raised so a few hundred phantoms
# already hold positives of every class.
DEFAULT_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.14,
    "Cardiomegaly": 0.08,
    "Effusion": 0.16,
    "Infiltration": 0.18,
    "Mass": 0.10,
    "Nodule": 0.10,
    "Pneumonia": 0.08,
    "Pneumothorax": 0.10,
    "Consolidation": 0.08,
    "Edema": 0.08,
    "Emphysema": 0.08,
    "Fibrosis": 0.08,
    "Pleural_Thickening": 0.08,
    "Hernia": 0.08,
}
# (first, second, lift): P(second | first) is about lift x P(second), marginals kept.
DEFAULT_CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("Cardiomegaly", "Effusion", 2.5),
    ("Effusion", "Edema", 2.5),
    ("Atelectasis", "Effusion", 2.0),
    ("Mass", "Nodule", 2.5),
    ("Infiltration", "Pneumonia", 2.0),
)


@dataclass
class PhantomConfig:
    """How a phantom data set is drawn.

    Findings absent from `prevalence` are never drawn (and so labelled 0). Every image belongs
    to a patient with 1 + Poisson(`followups`) images (at most 2**VISIT_BITS), like real
    follow-ups; test patients are drawn first, then val patients from the rest.
    """

    size: int = 128
    prevalence: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    co_occurrence: tuple[tuple[str, str, float], ...] = DEFAULT_CO_OCCURRENCE
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    followups: float = 1.0

    def __post_init__(self) -> None:
        for name, p in self.prevalence.items():
            if name not in FINDINGS:
                raise ValueError(f"PhantomConfig.prevalence: unknown finding {name!r}")
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"PhantomConfig.prevalence[{name!r}] = {p} is not in [0, 1]")
        for a, b, lift in self.co_occurrence:
            if a not in FINDINGS or b not in FINDINGS or lift <= 0:
                raise ValueError(f"PhantomConfig.co_occurrence: bad pair {(a, b, lift)!r}")
        if self.val_fraction < 0 or self.test_fraction < 0 or (
            self.val_fraction + self.test_fraction >= 1
        ):
            raise ValueError("PhantomConfig: val_fraction + test_fraction must be in [0, 1)")


# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class _Body:
    """One patient's anatomy (plus the shape changes some findings cause)."""

    lung_x: float  # lateral centre of each lung ellipse
    lung_y: float
    lung_ax: float
    lung_ay: float
    dome_y: tuple[float, float]  # diaphragm dome tops, (image left, image right)
    dome_h: float  # how far the domes fall to the costophrenic angles
    heart_x: float
    heart_y: float
    heart_ax: float
    heart_ay: float
    heart_tilt: float
    shift: float  # mediastinal shift to the image right
    tissue: float
    air: float
    rib_top: float
    rib_gap: float
    clavicle_y: float
    vessels: float
    vessel_phase: tuple[float, float, float]  # (image left, image right, bend)
    bubble: float  # stomach gas under the left hemidiaphragm
    ptx: tuple[int, float, float] | None = None  # pneumothorax (side, rim width, lowest y)


def _sample_body(rng: np.random.Generator) -> _Body:
    """A random patient: lung, heart and diaphragm sizes and places, tissue and air density."""
    u = rng.uniform
    dome = u(0.42, 0.56)
    return _Body(
        lung_x=u(0.37, 0.42),
        lung_y=u(0.08, 0.16),
        lung_ax=u(0.27, 0.33),
        lung_ay=u(0.80, 0.90),
        dome_y=(dome - u(0.0, 0.06), dome),
        dome_h=u(0.16, 0.26),
        heart_x=u(0.08, 0.14),
        heart_y=u(0.42, 0.48),
        heart_ax=u(0.29, 0.34),
        heart_ay=u(0.2, 0.24),
        heart_tilt=u(0.3, 0.5),
        shift=u(-0.02, 0.02),
        tissue=u(0.62, 0.75),
        air=u(0.40, 0.52),
        rib_top=u(-0.86, -0.78),
        rib_gap=u(0.12, 0.145),
        clavicle_y=u(-0.52, -0.44),
        vessels=u(0.09, 0.15),
        vessel_phase=(u(0, 6.3), u(0, 6.3), u(0, 6.3)),
        bubble=u(0.0, 0.2) * (u() < 0.7),
    )


def _soft(sd: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (negative inside)."""
    return np.clip(0.5 - sd / edge, 0.0, 1.0)


def _dome(b: _Body, xs, right) -> np.ndarray:
    """Diaphragm height under a lung; it falls laterally into the costophrenic angle.

    xs grows laterally from the midline; right is True (or a bool array) on the image right.
    """
    top = np.where(right, np.float32(b.dome_y[1]), np.float32(b.dome_y[0]))
    return top + b.dome_h * ((xs - b.lung_x + 0.05) / 0.3) ** 2


def _lung_sd(b: _Body, xs, y, right, shrink: float = 0.0):
    """Signed pseudo-distance to a lung's border (negative inside), both lungs at once.

    `shrink` (a number or an array) collapses the lung away from the chest wall and apex.
    """
    ax, ay = b.lung_ax - 0.5 * shrink, b.lung_ay - 0.6 * shrink
    cx, cy = b.lung_x - 0.5 * shrink, b.lung_y + 0.6 * shrink
    ell = (np.sqrt(((xs - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) - 1.0) * ax
    knob = 0.05 * np.exp(-(((y + 0.3) / 0.08) ** 2)) * right  # aortic knob, image right
    medial = 0.085 + knob + np.where(right, np.float32(b.shift), np.float32(-b.shift)) - xs
    return np.maximum(np.maximum(ell, y - _dome(b, xs, right)), medial)


@dataclass
class _Canvas:
    """The grid and the lungs, shared by the finding drawings. Arrays are [S, S]."""

    x: np.ndarray  # canonical coordinates
    y: np.ndarray
    px: float  # one pixel in canonical units
    body: _Body
    lung_sd: np.ndarray  # signed distance to the nearer lung border
    air: np.ndarray  # how much air darkens each pixel: what an opacity can fill
    masks: tuple[np.ndarray, np.ndarray]  # soft lung masks (image left, image right)

    def lung(self, side: int) -> np.ndarray:
        return self.masks[side > 0]

    def edge(self) -> float:
        return 1.5 * self.px


def _grid(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Canonical coordinates of each pixel under a random patient pose (shift, tilt, zoom)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")  # [S, S] rows, columns
    angle = rng.uniform(-0.1, 0.1)
    zoom = rng.uniform(0.84, 1.1)
    dx, dy = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)
    c, s = float(np.cos(angle)) / zoom, float(np.sin(angle)) / zoom
    x = c * (u - dx) + s * (v - dy)
    y = -s * (u - dx) + c * (v - dy)
    return x, y, 2.0 / size / zoom


def _ribs(b: _Body, xs: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """Posterior ribs (arcs from the spine, widening gaps downward), fainter anterior ribs."""
    cage = _soft(np.sqrt(((xs - b.lung_x) / (b.lung_ax + 0.07)) ** 2
                         + ((y - b.lung_y) / b.lung_ay) ** 2) - 1, 0.05) * _soft(0.05 - xs, 0.03)
    out = np.zeros_like(y)
    for weight, bend, count, width in ((0.07, 0.0, 9.5, 0.45), (0.035, 1.0, 5.5, 0.35)):
        curve = (1 - bend) * 1.5 * (xs - 0.2) ** 2 - bend * (0.5 * xs - 0.25)
        u = (y - curve - b.rib_top) / b.rib_gap
        phase = u - 0.02 * u * u
        frac = phase - np.floor(phase)
        dist = np.minimum(frac, width - frac) * (b.rib_gap / px)  # pixels inside the band
        band = np.clip(dist / 1.5, 0, 1) + 0.4 * np.clip(1 - np.abs(dist - 1) / 1.5, 0, 1)  # cortex
        out += weight * band * ((phase > 0) & (phase < count))
    return out * cage


def _direction(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Unit complex number pointing along (dx, dy): cos(n * angle + a) is the real part of
    direction**n * exp(1j * a), far cheaper than arctan2 and cos on every pixel."""
    inv = 1 / (np.sqrt(dx * dx + dy * dy) + 1e-6)
    z = np.empty(np.broadcast_shapes(np.shape(dx), np.shape(dy)), dtype=np.complex64)
    z.real, z.imag = dx * inv, dy * inv
    return z


def _zpow(z: np.ndarray, n: int) -> np.ndarray:
    """z**n by repeated squaring (numpy's complex power is about 50x slower)."""
    out, base = None, z
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    return out


def _vessels(b: _Body, xs: np.ndarray, y: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bronchovascular markings fanning out of each hilum and thinning to the periphery."""
    dx, dy = xs - 0.17, y
    r = np.sqrt(dx * dx + dy * dy) + 1e-3
    wig = 0.4 * np.sin(6 * r + b.vessel_phase[2])
    phase = np.where(right, np.float32(b.vessel_phase[1]), np.float32(b.vessel_phase[0]))
    z = _direction(dx, dy) * _direction(np.float32(1), wig + phase)  # bent spokes
    z11 = _zpow(z, 11)
    out = np.zeros_like(y)
    for n, amp, width, zn in ((11, 1.0, 0.02, z11), (23, 0.6, 0.012, z11 * z11 * z)):
        c = zn.real
        w = width / (1 + 1.4 * r)
        thr = 1 - 0.5 * (n * w / r) ** 2
        out += amp * np.clip((c - thr) / (1 - thr), 0, 1)
    hilum = 0.7 / (1 + (r / 0.08) ** 4)
    fade = np.minimum(r / 0.12, 1) / (1 + r / 0.3)
    return b.vessels * (out * fade + hilum)


def _collapse(b: _Body, x, xs, y, right, sd, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Pneumothorax: where the collapsed lung still is (1 - free air) and its pleural line."""
    side, rim, lowest = b.ptx
    shrink = rim * np.clip((lowest - y) / 0.25, 0, 1)  # an apical or a full-length rim
    collapsed = _lung_sd(b, xs, y, right, shrink=shrink)
    on_side = side * x > 0
    free = np.clip(_soft(sd, 1.5 * px) - _soft(collapsed, 1.5 * px), 0, 1) * on_side
    apart = np.clip((collapsed - sd) / (2 * px), 0, 1)  # no line where nothing collapsed
    line = np.exp(-((collapsed / (1.2 * px)) ** 2)) * on_side * apart
    return 1 - free, line


def _torso(b: _Body, x: np.ndarray, xs: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Density [S, S] of everything but the lungs: soft tissue, spine, trachea, clavicles,
    and the stomach bubble."""
    shoulder = np.sqrt(np.clip(1 - ((np.minimum(y + 0.7, 0)) / 0.33) ** 2, 0, 1))
    width = 0.3 + 0.6 * shoulder + 0.04 * np.clip(y + 0.7, 0, None)
    dens = b.tissue * np.sqrt(np.clip(1 - (x / width) ** 2, 0, 1))  # path length through body
    spine = _soft(xs - 0.06, edge) * (1 + 0.3 * np.cos(2 * np.pi * y / 0.1))
    dens += 0.04 * spine - 0.08 * _soft(np.abs(x - 0.5 * b.shift) - 0.025, edge) * (y < -0.3)
    clav = y - b.clavicle_y + 0.45 * (xs - 0.1) - 0.35 * (xs - 0.1) ** 2
    dens += 0.12 * _soft(np.abs(clav) - 0.032, edge) * _soft(np.abs(xs - 0.37) - 0.28, 0.03)
    bubble_y = _dome(b, 0.32, True) + 0.08
    dens -= b.bubble * _soft(np.sqrt(((x - 0.32) / 1.4) ** 2 + (y - bubble_y) ** 2) - 0.05, 0.02)
    return dens


def _heart(b: _Body, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Soft mask [S, S] of the heart: a tilted ellipse, apex down and to the image right."""
    hx, hy = x - b.heart_x - b.shift, y - b.heart_y
    c, s = float(np.cos(b.heart_tilt)), float(np.sin(b.heart_tilt))
    q = np.sqrt(((c * hx + s * hy) / b.heart_ax) ** 2 + ((-s * hx + c * hy) / b.heart_ay) ** 2)
    return _soft((q - 1) * b.heart_ay, edge)


def _anatomy(b: _Body, x: np.ndarray, y: np.ndarray, px: float) -> tuple[np.ndarray, _Canvas]:
    """Density [S, S] of the chest, and the canvas the findings are drawn on.

    The lungs subtract air from the soft tissue, less at their thin borders and where the
    heart lies in front of them; vessels and ribs add on top.
    """
    edge = 1.5 * px
    xs, right = np.abs(x), x > 0
    heart = _heart(b, x, y, edge)
    sd = _lung_sd(b, xs, y, right)
    lung = _soft(sd, edge)
    thick = np.sqrt(np.clip(-sd / 0.2, 0, 1)) * (1 - 0.25 * np.clip((y - 0.1) / 0.5, 0, 1))
    vessels = _vessels(b, xs, y, right)
    if b.ptx is not None:
        inner, line = _collapse(b, x, xs, y, right, sd, px)
        vessels = vessels * inner + 0.07 * line
        thick = thick * inner + (1 - inner) * 0.9  # free pleural air, no lung markings
    air = lung * b.air * thick * (1 - 0.8 * heart)
    dens = _torso(b, x, xs, y, edge) + lung * vessels - air
    dens += _ribs(b, xs, y, px) * (0.3 + 0.7 * lung)
    masks = (lung * ~right, lung * right)
    return dens, _Canvas(x, y, px, b, sd, air, masks)


# ---------------------------------------------------------------------------------------------
# Findings that change the anatomy


def _cardiomegaly(b: _Body, rng: np.random.Generator) -> _Body:
    grow = rng.uniform(1.2, 1.5)
    return replace(b, heart_ax=b.heart_ax * grow, heart_ay=b.heart_ay * rng.uniform(1.05, 1.2),
                   heart_x=b.heart_x + 0.45 * (grow - 1) * b.heart_ax)


def _emphysema(b: _Body, rng: np.random.Generator) -> _Body:
    """Hyperinflation: bigger, darker lungs, low flat domes, a narrow heart, pruned vessels."""
    grow = rng.uniform(1.03, 1.12)
    drop = rng.uniform(0.04, 0.14)
    return replace(
        b, lung_ay=b.lung_ay * grow, lung_ax=b.lung_ax * (1 + 0.4 * (grow - 1)),
        lung_y=b.lung_y + 0.5 * drop, dome_y=(b.dome_y[0] + drop, b.dome_y[1] + drop),
        dome_h=b.dome_h * rng.uniform(0.35, 0.8), air=b.air * rng.uniform(1.05, 1.2),
        heart_ax=b.heart_ax * 0.9, vessels=b.vessels * rng.uniform(0.5, 0.8),
        rib_gap=b.rib_gap * 1.08,
    )


def _atelectasis_shape(b: _Body, rng: np.random.Generator) -> _Body:
    """Volume loss pulls the hemidiaphragm up and the mediastinum toward the collapse."""
    side = _side(rng)
    lift = rng.uniform(0.03, 0.12)
    domes = list(b.dome_y)
    domes[side > 0] -= lift
    return replace(b, dome_y=(domes[0], domes[1]), shift=b.shift + side * rng.uniform(0, 0.04))


def _pneumothorax_shape(b: _Body, rng: np.random.Generator) -> _Body:
    return replace(b, ptx=(_side(rng), rng.uniform(0.03, 0.11), rng.uniform(-0.3, 0.9)))


# ---------------------------------------------------------------------------------------------
# Findings drawn on top: each returns a density change [S, S]


def _side(rng: np.random.Generator) -> int:
    return -1 if rng.random() < 0.5 else 1


def _in_lung(cv: _Canvas, rng: np.random.Generator, side: int, margin: float = 0.0,
             ys: tuple[float, float] = (-0.8, 0.8)) -> tuple[float, float]:
    """A random canonical point (x, y) inside one lung, `margin` away from its border."""
    for _ in range(20):
        xs = rng.uniform(0.05, 0.8, 32)
        y = rng.uniform(ys[0], ys[1], 32)
        ok = np.flatnonzero(_lung_sd(cv.body, xs, y, side > 0) < -margin)
        if len(ok):
            return float(side * xs[ok[0]]), float(y[ok[0]])
    return float(side * cv.body.lung_x), float(cv.body.lung_y)


def _ball(cv: _Canvas, cx: float, cy: float, r: np.ndarray | float) -> np.ndarray:
    """Projected sphere: thickest at the centre, anti-aliased rim."""
    d = np.sqrt((cv.x - cx) ** 2 + (cv.y - cy) ** 2)
    return np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1)) + 0.3 * _soft(d - r, cv.edge()) * (d > r)


def _blobs(cv: _Canvas, rng: np.random.Generator, n: int, cx: float, cy: float,
           spread: float, sigma: tuple[float, float]) -> np.ndarray:
    """Sum of n Gaussian puffs scattered around (cx, cy): ill-defined airspace opacity."""
    out = np.zeros_like(cv.x)
    for _ in range(n):
        px, py = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
        s = rng.uniform(*sigma)
        out += np.exp(-((cv.x - px) ** 2 + (cv.y - py) ** 2) / (2 * s * s))
    return out


def _nodule(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(cv.x)
    for _ in range(1 + (rng.random() < 0.25)):
        r = rng.uniform(0.03, 0.06)
        ball = _ball(cv, *_in_lung(cv, rng, _side(rng), r), r)
        out += rng.uniform(0.5, 0.9) * ball * (cv.air + 0.05)
    return out


def _mass(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A large lobulated opacity; the outline is r * (1 + lobes(angle))."""
    r = rng.uniform(0.07, 0.15)
    cx, cy = _in_lung(cv, rng, _side(rng), 0.5 * r, ys=(-0.6, 0.5))
    z = _direction(cv.x - cx, cv.y - cy)
    lobes = (0.15 * _zpow(z, 3) * np.exp(1j * rng.uniform(0, 6.3))
             + 0.08 * _zpow(z, 5) * np.exp(1j * rng.uniform(0, 6.3))).real
    ball = _ball(cv, cx, cy, r * (1 + lobes))
    return rng.uniform(0.6, 1.0) * ball * (cv.air + 0.08)


def _effusion(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Fluid at the lung base: blunted costophrenic angle, meniscus climbing the chest wall."""
    b = cv.body
    sides = (-1, 1) if rng.random() < 0.3 else (_side(rng),)
    out = np.zeros_like(cv.x)
    for side in sides:
        xs = side * cv.x
        level = b.dome_y[side > 0] - rng.uniform(-0.08, 0.3)  # from the dome top
        top = level - 0.2 * np.clip((xs - 0.2) / (b.lung_x + 0.1), 0, 1) ** 2  # meniscus
        fluid = np.clip((cv.y - top) / rng.uniform(0.03, 0.08), 0, 1)
        out += fluid * cv.lung(side) * rng.uniform(0.8, 1.0)
    return np.minimum(out, 1) * cv.air


def _consolidation(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dense lobar opacity with a sharp fissure border and air bronchograms."""
    side = _side(rng)
    upper = rng.random() < 0.4
    fissure = rng.uniform(-0.15, 0.1)
    lobe = _soft((cv.y - fissure) if upper else (fissure - cv.y), cv.edge())
    cy = rng.uniform(-0.5, fissure - 0.1) if upper else rng.uniform(fissure + 0.1, 0.5)
    cx = side * rng.uniform(0.3, 0.5)
    patch = np.clip(_blobs(cv, rng, 6, cx, cy, 0.1, (0.05, 0.1)) - 0.3, 0, 0.5) / 0.5
    spokes = (_zpow(_direction(side * cv.x - 0.17, cv.y), 9) * np.exp(1j * rng.uniform(0, 6.3)))
    bronchi = np.clip(spokes.real - 0.85, 0, 1) * 4
    fill = rng.uniform(0.6, 0.95) * patch * (1 - 0.6 * bronchi)
    return fill * lobe * cv.lung(side) * cv.air


def _pneumonia(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    side = _side(rng)
    cx, cy = _in_lung(cv, rng, side, 0.05, ys=(-0.3, 0.5))
    patch = _blobs(cv, rng, int(rng.integers(2, 5)), cx, cy, 0.05, (0.04, 0.08))
    return rng.uniform(0.4, 0.75) * np.clip(patch, 0, 1) * cv.lung(side) * cv.air


def _infiltration(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(cv.x)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = _in_lung(cv, rng, _side(rng), 0.02)
        out += rng.uniform(0.25, 0.5) * _blobs(cv, rng, 1, cx, cy, 0.0, (0.03, 0.07))
    return np.minimum(out, 0.8) * cv.air


def _atelectasis(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A plate (discoid) band or a basal wedge of collapsed, denser lung."""
    side = _side(rng)
    xs = side * cv.x
    if rng.random() < 0.5:
        cy = rng.uniform(0.1, 0.4)
        tilt = rng.uniform(-0.25, 0.25)
        band = np.abs(cv.y - cy - tilt * (xs - 0.4)) - rng.uniform(0.012, 0.03)
        reach = _soft(np.abs(xs - rng.uniform(0.3, 0.5)) - rng.uniform(0.1, 0.2), 0.03)
        shape = _soft(band, cv.edge()) * reach
    else:
        slope = rng.uniform(1.2, 2.5)
        shape = _soft((xs - 0.12) * slope - (cv.y - 0.05), 0.02)
    return rng.uniform(0.7, 1.0) * shape * cv.lung(side) * cv.air


def _edema(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar (bat-wing) haze and Kerley B lines at the lateral bases."""
    b = cv.body
    sigma = rng.uniform(0.14, 0.28)
    d2 = (np.abs(cv.x) - b.lung_x + 0.2) ** 2 + (cv.y - b.lung_y + 0.12) ** 2
    haze = np.exp(-d2 / (2 * sigma * sigma))
    rim = _soft(-cv.lung_sd - rng.uniform(0.05, 0.1), 0.02) * (np.abs(cv.x) > 0.3)
    lines = np.zeros_like(cv.x)
    for _ in range(int(rng.integers(5, 12))):
        side_mask = cv.x > 0 if rng.random() < 0.5 else cv.x < 0
        lines += _soft(np.abs(cv.y - rng.uniform(0.2, 0.55)) - 0.5 * cv.px, cv.px) * side_mask
    fill = rng.uniform(0.15, 0.45) * haze + rng.uniform(0.3, 0.5) * lines * rim
    return np.minimum(fill, 0.9) * cv.air


def _fibrosis(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Irregular reticular net in the lung periphery (lower or upper zones)."""
    k = rng.uniform(30, 50)
    a = rng.uniform(0, np.pi)
    c, s = float(np.cos(a)), float(np.sin(a))
    wob = 0.8 * np.sin(9 * cv.x + 7 * cv.y + rng.uniform(0, 6.3))
    net = np.maximum(np.cos(k * (c * cv.x + s * cv.y) + wob),
                     np.cos(k * 1.3 * (c * cv.y - s * cv.x) - 1.5 * wob))
    net = np.clip((net - 0.7) / 0.3, 0, 1) * np.clip(0.5 + np.sin(13 * cv.y - 11 * cv.x), 0, 1)
    zone = _soft(cv.y - 0.1, 0.15) if rng.random() < 0.35 else _soft(0.05 - cv.y, 0.15)
    peripheral = _soft(-cv.lung_sd - 0.16, 0.05)
    return rng.uniform(0.6, 0.9) * net * zone * peripheral * cv.air


def _pleural_thickening(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A smooth band along the lateral chest wall, or an apical cap."""
    side = _side(rng)
    t = rng.uniform(0.05, 0.1) * (1 + 0.3 * np.sin(11 * cv.y + rng.uniform(0, 6)))
    rim = _soft(-cv.lung_sd - t, cv.edge()) * cv.lung(side)
    if rng.random() < 0.6:
        lo = rng.uniform(-0.4, 0.2)
        reach = rng.uniform(0.12, 0.3)
        zone = _soft(np.abs(cv.y - lo - reach) - reach, 0.04) * (side * cv.x > 0.3)
    else:
        zone = _soft(cv.y + 0.45, 0.06)
    return rng.uniform(0.6, 1.0) * rim * zone * (cv.air + 0.05)


def _hernia(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Hiatal hernia: a round retrocardiac density with a gas-fluid level."""
    b = cv.body
    r = rng.uniform(0.08, 0.14)
    cx = rng.uniform(-0.02, 0.1) + b.shift
    cy = float(_dome(b, b.lung_x, True)) - rng.uniform(0.05, 0.12)
    sac = _soft(np.sqrt((cv.x - cx) ** 2 + (cv.y - cy) ** 2) - r, cv.edge())
    level = cy + rng.uniform(-0.5, 0.2) * r
    gas = sac * _soft(cv.y - level, cv.edge())
    return rng.uniform(0.06, 0.14) * sac - rng.uniform(0.15, 0.3) * gas


_RESHAPE = {
    "Cardiomegaly": _cardiomegaly,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis_shape,
    "Pneumothorax": _pneumothorax_shape,
}
_DRAW = {
    "Atelectasis": _atelectasis,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
DRAWN: tuple[str, ...] = tuple(f for f in FINDINGS if f in _RESHAPE or f in _DRAW)


# ---------------------------------------------------------------------------------------------
# Rendering


def _expose(dens: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Film: exposure (contrast, brightness, gamma), blur and grain, to uint8."""
    img = (dens - 0.05) * rng.uniform(1.0, 1.5) + rng.uniform(-0.1, 0.1)
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)
    img = img + rng.uniform(0.01, 0.035) * rng.standard_normal(img.shape, dtype=np.float32)
    img = gaussian_filter(img, rng.uniform(0.4, 0.8) * max(size / 128, 0.5), truncate=2.5)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_phantom(seed: int, size: int, findings: Sequence[str] = ()) -> np.ndarray:
    """A chest-X-ray-like uint8 [size, size] image with the given findings drawn in.

    Deterministic per (seed, size, set of findings); the same seed with and without a finding
    differs only by that finding's drawing (and the anatomy it changes).
    """
    unknown = sorted(set(findings) - set(DRAWN))
    if unknown:
        raise ValueError(f"render_phantom: cannot draw {unknown}; drawable findings: {DRAWN}")
    if size < MIN_SIZE:
        raise ValueError(f"render_phantom: size must be at least {MIN_SIZE} pixels, got {size}")
    present = [f for f in FINDINGS if f in set(findings)]
    rngs = {f: np.random.default_rng([seed, 2, FINDINGS.index(f)]) for f in present}
    body = _sample_body(np.random.default_rng([seed >> VISIT_BITS, 0]))
    for f in present:
        if f in _RESHAPE:
            body = _RESHAPE[f](body, rngs[f])
    view = np.random.default_rng([seed, 1])
    x, y, px = _grid(size, view)
    dens, canvas = _anatomy(body, x, y, px)
    for f in present:
        if f in _DRAW:
            dens += _DRAW[f](canvas, rngs[f])
    return _expose(dens, view, size)


# ---------------------------------------------------------------------------------------------
# Data set


def load_phantom_row(row: pd.Series) -> np.ndarray:
    """ImageLoader for phantom rows: renders from the row's seed, size and finding labels."""
    names = [f for f in str(row["finding_labels"]).split("|") if f != "No Finding"]
    unknown = sorted(set(names) - set(DRAWN))
    if unknown:
        raise DataError(f"{row['id']}: finding_labels names {unknown}, which phantoms cannot draw")
    return render_phantom(int(row["phantom_seed"]), int(row["size"]), names)


def draw_labels(n: int, config: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 [n, 14] labels over FINDINGS with the configured prevalence and co-occurrence.

    Findings are drawn in FINDINGS order; a later finding's probability is multiplied by the
    lift of each paired earlier finding that is present, then divided by the expected lift so
    the marginal prevalence stays as configured (up to clipping at 1).
    """
    labels = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    for j, name in enumerate(FINDINGS):
        p = config.prevalence.get(name, 0.0) if name in DRAWN else 0.0
        factor, expected = np.ones(n), 1.0
        for a, b, lift in config.co_occurrence:
            first, second = (a, b) if FINDINGS.index(a) < FINDINGS.index(b) else (b, a)
            if second == name:
                pa = config.prevalence.get(first, 0.0)
                factor = factor * np.where(labels[:, FINDINGS.index(first)] > 0, lift, 1.0)
                expected *= 1 + pa * (lift - 1)
        labels[:, j] = rng.random(n) < np.clip(p * factor / expected, 0, 1)
    return labels


def _patients(n: int, config: PhantomConfig,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Patient index and visit number for each of n images."""
    visits = 1 + np.minimum(rng.poisson(config.followups, n), 2**VISIT_BITS - 1)
    patient = np.repeat(np.arange(n), visits)[:n]
    first = np.repeat(np.cumsum(visits) - visits, visits)[:n]  # index of the patient's first image
    return patient, np.arange(n) - first


def _splits(patients: pd.Series, config: PhantomConfig, seed: int) -> np.ndarray:
    """train/val/test by patient: test patients first, then val patients from the rest."""
    split = patient_split(patients, config.test_fraction, seed).astype(object)
    split[split == "val"] = "test"
    rest = split == "train"
    if rest.any():
        val = config.val_fraction / (1 - config.test_fraction)
        split[rest] = patient_split(patients[rest], val, seed + 1)
    return split.astype(str)


def phantom_dataset(n: int, *, size: int | None = None, seed: int = 0,
                    config: PhantomConfig | None = None, name: str = SOURCE) -> XrayDataset:
    """n phantoms as an XrayDataset (source and name `name`) over the 14 FINDINGS.

    Findings a phantom does not draw are labelled 0, not NaN: they are known to be absent.
    `size` overrides config.size. Images are rendered lazily by `load_phantom_row`, so the
    data set is small and pickles for worker processes. Another `name` gives other ids and
    source, so two phantom sets (say, of two sizes) can be merged.
    """
    config = config or PhantomConfig()
    size = config.size if size is None else size
    if n < 1 or seed < 0:
        raise ValueError(f"phantom_dataset: need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    if size < MIN_SIZE:  # here, not image by image when a cache is half made
        raise ValueError(f"phantom size must be at least {MIN_SIZE} pixels, got {size}")
    rng = np.random.default_rng([seed, 7])
    labels = draw_labels(n, config, rng)
    patient, visit = _patients(n, config, rng)
    patient_seed = (np.int64(seed) << _PATIENT_BITS) + patient
    names = ["|".join(np.asarray(FINDINGS)[row > 0]) or "No Finding" for row in labels]
    meta = pd.DataFrame({
        "id": [f"{name}_{i:06d}" for i in range(n)],
        "patient": [f"{name}_p{p:06d}" for p in patient],
        "source": name,
        "path": "",
        "phantom_seed": (patient_seed << VISIT_BITS) + visit,
        "finding_labels": names,
        "size": size,
    })
    meta.insert(2, "split", _splits(meta["patient"], config, seed))
    return XrayDataset(name, list(FINDINGS), labels, meta, {name: load_phantom_row})
