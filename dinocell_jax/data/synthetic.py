"""Synthetic Cell Painting fields: 5 stains of the same cells, labelled phenotypes, plate effects.

`SyntheticCellPainting` is the default data source: no download, random access,
every field a pure function of (seed, index). It draws a tissue of cells (a
jittered lattice of cell centres with gaps; cell bodies are Voronoi regions cut
at a per-cell radius) and paints the five stains of `config.CHANNELS`:

- DNA (Hoechst): filled elliptical nuclei with chromatin texture;
- ER (concanavalin A): reticular haze decaying away from the nucleus;
- RNA (SYTO 14): nucleoli spots inside nuclei, faint cytoplasm;
- AGP (phalloidin + WGA): bright cell edges (cortical actin, membranes), faint fibres;
- Mito (MitoTracker): filaments and puncta in the perinuclear cytoplasm.

Counts are camera-like: offset ~100, background a few hundred, signal up to
tens of thousands, shot noise plus read noise, clipped to uint16.

Phenotypes (labels) change cell size, nucleus size and shape, chromatin texture,
mitochondrial morphology and the stains' intensity ratios (`phenotypes="shared"`:
only what every stain draws, cell and nucleus size and shape and confluence); their
definitions do not depend on `seed`, so a train set and a validation set with
different seeds share label semantics. Plates and batches scale each stain's gain and offset
(batch effects), so a held-out split by plate is meaningful.

Layout of the index i (fixed, so every field's metadata is known without
rendering it): plate = i % n_plates; within the plate, j = i // n_plates
walks sites fastest (4 per well), then the 384 wells row-major (A01, A02, ...,
P24); label = well index % n_phenotypes (one perturbation per well, the same
plate map on every plate, as in JUMP replicate plates).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dinocell_jax.config import CHANNELS, PHENOTYPE_SETS

SITES_PER_WELL = 4
WELL_ROWS = "ABCDEFGHIJKLMNOP"  # a 384-well plate: 16 rows x 24 columns
WELL_COLS = 24
PLATES_PER_BATCH = 2

_BANK_PLANES = 4  # texture planes per scale, per process
_CAMERA_OFFSET = 100.0  # counts a dark sCMOS pixel reads
_READ_NOISE = 6.0  # counts, sd
# Peak stain brightness (counts) before phenotype and plate gains; DNA, ER, RNA, AGP, Mito.
_AMPLITUDE = np.array([14000.0, 5000.0, 4000.0, 7000.0, 9000.0], np.float32)
_BACKGROUND = np.array([250.0, 400.0, 300.0, 350.0, 300.0], np.float32)  # out-of-cell fluorescence


@dataclasses.dataclass(frozen=True)
class Phenotype:
    """What a label changes; lengths in pixels, gains per stain in CHANNELS order."""

    spacing: float  # lattice period of cell centres: cell size
    cell_radius: float  # cell body radius as a fraction of spacing (gaps between cells)
    nucleus: float  # nucleus semi-major axis as a fraction of spacing
    aspect: float  # nucleus major/minor axis ratio
    chromatin: float  # strength of the nuclear texture
    punctate: float  # mitochondria: 0 filamentous ... 1 punctate
    gains: tuple[float, float, float, float, float]
    confluence: float = 0.88  # mean fraction of the monolayer's cell slots that hold a cell


# Hand-made so that the first four labels differ along different axes:
# size, nuclear shape/texture, organelle intensity ratios.
_STAIN_SPECIFIC = (
    Phenotype(30.0, 0.62, 0.30, 1.15, 0.15, 0.3, (1.0, 1.0, 1.0, 1.0, 1.0), 0.88),  # control
    Phenotype(42.0, 0.70, 0.24, 1.10, 0.10, 0.2, (0.9, 1.3, 1.0, 1.5, 0.9), 0.75),  # enlarged, spread
    Phenotype(28.0, 0.60, 0.28, 1.90, 0.55, 0.4, (1.4, 0.9, 0.7, 1.0, 1.0), 0.55),  # condensed, elongated, cell loss
    Phenotype(32.0, 0.64, 0.32, 1.20, 0.20, 0.9, (1.0, 0.6, 1.4, 0.8, 1.8), 0.85),  # mito/ER stress
)
# `phenotypes="shared"`: each label with the control's chromatin texture, mitochondrial
# morphology and gains, so that labels differ only in what every stain draws: cell size and
# spacing (AGP's edges, the ER's and Mito's extent), confluence, nucleus size and shape (DNA, the
# ER's and Mito's hole around it, RNA's nucleoli within it); what channel-invariant features can
# keep (docs/BENCHMARKS.md, "Does pretraining learn?"). Label 3, the stain-specific set's mito/ER
# stress, would then be nearly the control: it becomes small, dense, round cells instead.
_SHARED_LABEL_3 = dataclasses.replace(_STAIN_SPECIFIC[0], spacing=24.0, cell_radius=0.66, nucleus=0.36,
                                      aspect=1.0, confluence=0.95)


def phenotype(label: int, phenotype_set: str = "stain_specific") -> Phenotype:
    """The definition of a label in `phenotype_set` (config.PHENOTYPE_SETS); labels past the
    hand-made four are drawn from a fixed stream."""
    if phenotype_set not in PHENOTYPE_SETS:
        raise ValueError(f"phenotypes={phenotype_set!r} is not one of {PHENOTYPE_SETS}")
    if phenotype_set == "shared":
        if label == 3:
            return _SHARED_LABEL_3
        control = _STAIN_SPECIFIC[0]
        return dataclasses.replace(phenotype(label), chromatin=control.chromatin, punctate=control.punctate,
                                   gains=control.gains)
    if label < len(_STAIN_SPECIFIC):
        return _STAIN_SPECIFIC[label]
    rng = np.random.default_rng([0x9E37, label])
    return Phenotype(
        spacing=float(rng.uniform(26.0, 44.0)),
        cell_radius=float(rng.uniform(0.58, 0.72)),
        nucleus=float(rng.uniform(0.23, 0.33)),
        aspect=float(rng.uniform(1.0, 2.0)),
        chromatin=float(rng.uniform(0.1, 0.55)),
        punctate=float(rng.uniform(0.0, 1.0)),
        gains=tuple(float(g) for g in np.exp(rng.normal(0.0, 0.35, 5))),
        confluence=float(rng.uniform(0.45, 0.95)),
    )


def _periodic_textures(n: int, size: int, sigma: float, seed: int) -> np.ndarray:
    """[n, size, size] float32 unit-variance Gaussian random fields, smoothed with `sigma` px.

    Periodic (made in Fourier space), so any circular shift of a plane is again
    a seamless texture: fields draw shifted, transposed, flipped planes of this
    bank instead of paying for fresh smooth noise (a GEMM or FFT per field).
    """
    rng = np.random.default_rng([seed, 3, int(sigma * 1000)])
    white = rng.standard_normal((n, size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    spectrum = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    smooth = np.fft.irfft2(np.fft.rfft2(white) * spectrum, s=(size, size))
    smooth /= smooth.std(axis=(1, 2), keepdims=True)
    return smooth.astype(np.float32)


def _ramp(x):
    """A soft step over one pixel: 0 below -0.5, 1 above 0.5."""
    return np.clip(x + 0.5, 0.0, 1.0)


class SyntheticCellPainting:
    """Random-access synthetic Cell Painting fields, deterministic by (seed, index).

    ds[i] -> dict(field=uint16 [n_channels, field_size, field_size], label=int,
    plate=str, well=str ('B03'), site=int, batch=str, source='synthetic').
    Picklable (grain spawns workers); the only state is the constructor's
    arguments plus small caches rebuilt on demand.
    """

    def __init__(self, num_fields: int, field_size: int = 256, n_phenotypes: int = 4,
                 n_plates: int = 4, seed: int = 0, n_channels: int = 5, phenotypes: str = "stain_specific"):
        if num_fields <= 0:
            raise ValueError(f"SyntheticCellPainting: num_fields={num_fields} must be positive")
        if field_size < 8:
            raise ValueError(f"SyntheticCellPainting: field_size={field_size} must be at least 8")
        if n_phenotypes < 1:
            raise ValueError(f"SyntheticCellPainting: n_phenotypes={n_phenotypes} must be at least 1")
        if n_plates < 1:
            raise ValueError(f"SyntheticCellPainting: n_plates={n_plates} must be at least 1")
        if not 1 <= n_channels <= len(CHANNELS):
            raise ValueError(f"SyntheticCellPainting: n_channels={n_channels} must be in 1..{len(CHANNELS)}")
        self.num_fields = int(num_fields)
        self.field_size = int(field_size)
        self.n_phenotypes = int(n_phenotypes)
        self.n_plates = int(n_plates)
        self.seed = int(seed)
        self.n_channels = int(n_channels)
        self.channels = CHANNELS[:n_channels]
        self.phenotypes = phenotypes
        self._phenotypes = [phenotype(k, phenotypes) for k in range(self.n_phenotypes)]
        self._banks: dict[float, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_fields

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_banks"] = {}  # rebuilt on first use (deterministic from seed); keeps pickles small
        return state

    def _index(self, i) -> int:
        i = int(i)
        if not -self.num_fields <= i < self.num_fields:
            raise IndexError(f"SyntheticCellPainting: index {i} out of range for {self.num_fields} fields")
        return i % self.num_fields

    def metadata(self, i: int) -> dict:
        """The metadata of field i without rendering it: label, plate, well, site, batch, source."""
        i = self._index(i)
        plate = i % self.n_plates
        j = i // self.n_plates
        wells = len(WELL_ROWS) * WELL_COLS
        well = (j // SITES_PER_WELL) % wells
        # Past 384 wells a plate keeps imaging the same wells at further sites, so
        # (plate, well, site) stays unique.
        site = j % SITES_PER_WELL + SITES_PER_WELL * (j // (SITES_PER_WELL * wells))
        return {
            "label": well % self.n_phenotypes,
            "plate": f"SYNTH-P{plate:03d}",
            "well": f"{WELL_ROWS[well // WELL_COLS]}{well % WELL_COLS + 1:02d}",
            "site": int(site),
            "batch": f"SYNTH-B{plate // PLATES_PER_BATCH:02d}",
            "source": "synthetic",
        }

    def __getitem__(self, i) -> dict:
        i = self._index(i)
        meta = self.metadata(i)
        plate = i % self.n_plates
        rng = np.random.default_rng([self.seed, 0, i])
        field = self._render(rng, self._phenotypes[meta["label"]], self._plate_effect(plate))
        return {"field": field, **meta}

    def _plate_effect(self, plate: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-stain (gain [5], extra offset [5]) of a plate: batch effect times plate effect."""
        batch_rng = np.random.default_rng([self.seed, 1, plate // PLATES_PER_BATCH])
        plate_rng = np.random.default_rng([self.seed, 2, plate])
        gain = np.exp(batch_rng.normal(0.0, 0.15, 5) + plate_rng.normal(0.0, 0.08, 5))
        offset = batch_rng.uniform(-60.0, 120.0, 5) + plate_rng.uniform(-20.0, 20.0, 5)
        return gain.astype(np.float32), offset.astype(np.float32)

    def _texture(self, rng, sigma: float) -> np.ndarray:
        """[S, S] float32 unit-variance smooth noise, correlation length ~ sigma px."""
        bank = self._banks.get(sigma)
        if bank is None:
            bank = self._banks[sigma] = _periodic_textures(_BANK_PLANES, self.field_size, sigma, self.seed)
        plane = np.roll(bank[rng.integers(len(bank))], rng.integers(0, self.field_size, 2), axis=(0, 1))
        flip_y, flip_x, transpose = rng.random(3) < 0.5
        plane = plane[::-1] if flip_y else plane
        plane = plane[:, ::-1] if flip_x else plane
        return plane.T if transpose else plane

    def _cells(self, rng, ph: Phenotype):
        """Nearest and second-nearest cell centre of every pixel.

        Centres sit on a jittered lattice of integer period s, so the nearest centre
        of a pixel is among the 3x3 lattice slots around its own: the search runs
        blockwise on an [nb, s, nb, s] canvas (a reshape of the image) with no gathers.
        Returns slot (int [S,S], flat lattice slot of the nearest centre), d1, d2
        (float32 [S,S], distances to the nearest and second-nearest centre), dy, dx
        (float32 [S,S], offset from the nearest centre), the slot count and s.
        """
        size = self.field_size
        s = max(8, int(round(ph.spacing * math.exp(rng.normal(0.0, 0.06)))))
        nb = size // s + 2
        ns = nb + 2  # one ring of slots outside the canvas
        phase = rng.integers(0, s, 2)
        jitter = rng.uniform(-0.32, 0.32, (2, ns, ns)) * s
        cy = (np.arange(ns)[:, None] - 1 + 0.5) * s + jitter[0]
        cx = (np.arange(ns)[None, :] - 1 + 0.5) * s + jitter[1]
        # Confluence varies from field to field (seeding, growth, toxicity): the fraction
        # of lattice slots holding a cell, around the phenotype's mean.
        occupancy = float(np.clip(ph.confluence + rng.normal(0.0, 0.18), 0.15, 1.0))
        present = rng.random((ns, ns)) < occupancy
        cy = np.where(present, cy, -1e4).astype(np.float32)
        cx = np.where(present, cx, -1e4).astype(np.float32)

        within = np.arange(s, dtype=np.float32)
        block = np.arange(nb, dtype=np.float32) * s
        py = (block[:, None] + within[None, :])[:, :, None, None]  # canvas y, [nb, s, 1, 1]
        px = (block[:, None] + within[None, :])[None, None, :, :]  # canvas x, [1, 1, nb, s]
        d1 = np.full((nb, s, nb, s), 1e12, np.float32)
        d2 = np.full((nb, s, nb, s), 1e12, np.float32)
        d = np.empty_like(d1)
        closer = np.empty(d1.shape, bool)
        best = np.zeros((nb, s, nb, s), np.int8)
        offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
        for k, (a, b) in enumerate(offsets):
            ky = cy[1 + a:1 + a + nb, 1 + b:1 + b + nb][:, None, :, None]
            kx = cx[1 + a:1 + a + nb, 1 + b:1 + b + nb][:, None, :, None]
            np.add((py - ky) ** 2, (px - kx) ** 2, out=d)
            np.less(d, d1, out=closer)
            np.minimum(d2, np.maximum(d1, d), out=d2)
            np.minimum(d1, d, out=d1)
            best[closer] = k

        crop = (slice(phase[0], phase[0] + size), slice(phase[1], phase[1] + size))
        best = best.reshape(nb * s, nb * s)[crop]
        d1 = np.sqrt(d1.reshape(nb * s, nb * s)[crop])
        d2 = np.sqrt(d2.reshape(nb * s, nb * s)[crop])
        off = np.array(offsets)
        rows = np.arange(phase[0], phase[0] + size) // s
        cols = np.arange(phase[1], phase[1] + size) // s
        slot = (rows[:, None] + 1 + off[best, 0]) * ns + (cols[None, :] + 1 + off[best, 1])
        y = np.arange(phase[0], phase[0] + size, dtype=np.float32)[:, None]
        x = np.arange(phase[1], phase[1] + size, dtype=np.float32)[None, :]
        dy = y - cy.reshape(-1)[slot]
        dx = x - cx.reshape(-1)[slot]
        return slot, d1, d2, dy, dx, ns * ns, s

    def _render(self, rng, ph: Phenotype, plate_effect) -> np.ndarray:
        size = self.field_size
        slot, d1, d2, dy, dx, n_slots, s = self._cells(rng, ph)

        # Per-cell properties, looked up by each pixel's cell.
        radius = (ph.cell_radius * s * np.exp(rng.normal(0.0, 0.08, n_slots))).astype(np.float32)
        semi_major = ph.nucleus * s * np.exp(rng.normal(0.0, 0.1, n_slots))
        aspect = ph.aspect * np.exp(rng.normal(0.0, 0.08, n_slots))
        angle = rng.uniform(0.0, np.pi, n_slots)
        inv_a = (1.0 / semi_major).astype(np.float32)
        inv_b = (aspect / semi_major).astype(np.float32)
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        # DNA content: most cells in G1, ~15% in S/G2 with up to twice the DNA.
        cycle = np.where(rng.random(n_slots) < 0.15, 1.7, 1.0)
        dna = (np.exp(rng.normal(0.0, 0.12, n_slots)) * cycle).astype(np.float32)
        cell_gain = np.exp(rng.normal(0.0, 0.2, (5, n_slots))).astype(np.float32)

        r = radius[slot]
        edge = np.minimum(0.5 * (d2 - d1), r - d1)  # distance to the cell's outline, > 0 inside
        body = _ramp(edge)
        c, sn = cos[slot], sin[slot]
        u = (dy * c + dx * sn) * inv_a[slot]
        v = (dx * c - dy * sn) * inv_b[slot]
        rn = np.sqrt(u * u + v * v)  # elliptical radius, 1 on the nuclear envelope
        nuc_size = 1.0 / inv_a[slot]
        nucleus = _ramp((1.0 - rn) * nuc_size) * body
        beyond = np.maximum(rn - 1.0, 0.0) * nuc_size  # px outside the nucleus
        cyto = body * (1.0 - nucleus)

        # A fine texture is shared only between compartments that do not overlap
        # (nucleus vs cytoplasm) or is used transposed.
        fine = (self._texture(rng, 1.3), self._texture(rng, 1.3))
        coarse = self._texture(rng, 3.2)
        spots = np.maximum(self._texture(rng, 1.8) - 1.1, 0.0)

        chromatin = np.clip(1.0 + ph.chromatin * fine[0] + 0.1 * coarse, 0.2, None)
        dna_c = nucleus * chromatin * dna[slot]
        reticulum = np.exp(-2.0 * fine[1] ** 2)  # ridges of a random field: a network
        er = cyto * np.exp(-beyond / (0.35 * s)) * (0.35 + 0.65 * reticulum) + 0.08 * nucleus
        rna = nucleus * (0.25 + 2.5 * spots) + cyto * 0.3 * np.exp(0.2 * coarse)
        fibres = np.exp(-3.0 * fine[1].T ** 2)
        agp = body * (np.exp(-((edge - 1.0) / 1.5) ** 2) + 0.15 + 0.2 * fibres)
        filaments = np.exp(-4.0 * fine[0] ** 2) * np.exp(0.3 * coarse)
        puncta = np.minimum(3.0 * np.maximum(fine[0] - 0.9, 0.0), 1.0)
        mito = cyto * np.exp(-beyond / (0.5 * s)) * ((1.0 - ph.punctate) * filaments + ph.punctate * puncta)

        signal = np.stack([dna_c, er, rna, agp, mito][: self.n_channels])
        signal *= np.take(cell_gain[: self.n_channels], slot, axis=1)
        gain, offset = plate_effect
        exposure = np.exp(rng.normal(0.0, 0.05, 5)).astype(np.float32)
        amp = (_AMPLITUDE * np.array(ph.gains, np.float32) * gain * exposure)[: self.n_channels]
        # Illumination falls off towards the corners (uncorrected vignetting).
        yy = (np.arange(size, dtype=np.float32) - size / 2) / size
        vignette = 1.0 - 0.25 * (yy[:, None] ** 2 + yy[None, :] ** 2)
        signal *= vignette
        signal *= amp[:, None, None]
        signal += (_CAMERA_OFFSET + _BACKGROUND + offset)[: self.n_channels, None, None]
        # Shot noise (1 count per photoelectron) plus read noise; uniform draws of the
        # same variance are ~7x cheaper than normal ones and look the same at these counts.
        noise = rng.random(signal.shape, dtype=np.float32)
        noise -= 0.5
        noise *= np.sqrt(signal + _READ_NOISE**2) * np.float32(2 * math.sqrt(3))
        signal += noise
        return np.clip(np.rint(signal, out=signal), 0, 65535, out=signal).astype(np.uint16)
