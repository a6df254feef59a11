"""The generated clip the demo VAE is trained on (tools/train_demo_vae.py): video a person reads at a
glance, drawn from a seeded Scene: a scrolling text line in a 5x7 bitmap font, a rotating square, a
gliding triangle, a shaded bouncing ball with a soft shadow, sky and ground gradients. Any window
of the canvas and any frames can be rendered, for training crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEMO_SEED = 0  # the demo clip is demo_clip(seed=DEMO_SEED)
CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH = 65, 192, 256


# A 5x7 bitmap font for the scrolling line: each glyph is 7 rows of 5 bits.
_GLYPHS = {
    " ": "00000 00000 00000 00000 00000 00000 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
}
_CHARS = "".join(_GLYPHS)
_FONT = torch.tensor([[[int(b) for b in row] for row in g.split()] for g in _GLYPHS.values()], dtype=torch.float32)
DEMO_TEXT = "STREAMDEC  WAN 2.1 VAE  0123456789  "


@dataclass
class Scene:
    """Everything one clip is drawn from; colours are RGB in [0, 1], lengths in pixels of the
    192x256 canvas, speeds per frame."""

    sky: tuple  # (top colour, bottom colour)
    ground: tuple
    horizon: float
    text: str
    text_colour: tuple
    band_colour: tuple
    text_speed: float
    square: tuple  # (cx, cy, half side, angle, angular speed, colour)
    triangle: tuple  # (x0, y, radius, x speed, angle, angular speed, colour)
    ball: tuple  # (x0, radius, x speed, bounce height, bounce period, phase, colour)

    @classmethod
    def from_seed(cls, seed: int) -> Scene:
        """The demo's scene for DEMO_SEED; for any other seed a variation of it (training data):
        its colours shifted a little, and new text, places, sizes, speeds and bounces."""
        demo = cls(sky=((0.16, 0.27, 0.55), (0.62, 0.78, 0.92)), ground=((0.42, 0.62, 0.28), (0.22, 0.38, 0.16)),
                   horizon=136.0, text=DEMO_TEXT, text_colour=(1.0, 0.92, 0.3), band_colour=(0.1, 0.1, 0.16),
                   text_speed=2.0, square=(70.0, 92.0, 22.0, 0.3, 0.05, (0.95, 0.55, 0.12)),
                   triangle=(150.0, 78.0, 24.0, 1.2, 0.0, -0.03, (0.3, 0.85, 0.75)),
                   ball=(40.0, 16.0, 2.6, 70.0, 30.0, 0.0, (0.9, 0.15, 0.2)))  # fmt: skip
        if seed == DEMO_SEED:
            return demo
        g = torch.Generator().manual_seed(seed)

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand((), generator=g).item()

        def near(colour):
            return tuple(min(1.0, max(0.0, c + u(-0.12, 0.12))) for c in colour)

        text = "".join(_CHARS[int(i)] for i in torch.randint(len(_CHARS), (40,), generator=g))
        return cls(sky=tuple(map(near, demo.sky)), ground=tuple(map(near, demo.ground)), horizon=u(120, 150),
                   text=text, text_colour=near(demo.text_colour), band_colour=near(demo.band_colour),
                   text_speed=float(torch.randint(-3, 4, (), generator=g)),
                   square=(u(20, 236), u(50, 150), u(12, 32), u(0, 6.3), u(-0.12, 0.12), near(demo.square[-1])),
                   triangle=(u(0, 256), u(50, 150), u(14, 34), u(-3, 3), u(0, 6.3), u(-0.1, 0.1),
                             near(demo.triangle[-1])),
                   ball=(u(0, 256), u(10, 22), u(-4, 4), u(20, 90), u(16, 40), u(0, 1), near(demo.ball[-1])))  # fmt: skip

    def render(self, frames: torch.Tensor, top: int = 0, left: int = 0, height: int = CLIP_HEIGHT,
               width: int = CLIP_WIDTH) -> torch.Tensor:  # fmt: skip
        """The frames at times `frames` (1-D, in frames), the window height x width at (top, left)
        of the canvas (which extends past 192x256 the same way): (3, T, height, width) in [-1, 1]."""
        t = frames.float().view(-1, 1, 1)
        y = torch.arange(top, top + height, dtype=torch.float32).view(1, -1, 1) + 0.5
        x = torch.arange(left, left + width, dtype=torch.float32).view(1, 1, -1) + 0.5
        shape = (3, len(frames), height, width)

        # sky and ground: vertical gradients, the sky's brightness drifting slowly across
        above = (y < self.horizon).float()
        sky = _mix(self.sky[0], self.sky[1], (y / self.horizon).clamp(0, 1))
        sky = sky * (0.92 + 0.08 * torch.sin(x / 40 + t / 12))
        ground = _mix(self.ground[0], self.ground[1], ((y - self.horizon) / (CLIP_HEIGHT - self.horizon)).clamp(0, 1))
        image = (sky * above + ground * (1 - above)).expand(shape).clone()

        # the ball's shadow on the ground: a soft ellipse, fainter as the ball rises
        bx, radius, speed, bounce, period, phase, colour = self.ball
        cx = _wrap(bx + speed * t)
        lift = bounce * torch.sin(math.pi * (t / period + phase)).abs()
        floor = self.horizon + 0.55 * (CLIP_HEIGHT - self.horizon)
        spread = radius * (1.3 + lift / 120)
        inside = ((x - cx) / spread) ** 2 + ((y - floor) / (0.3 * spread)) ** 2
        image = image * (1 - 0.55 * (1.1 - inside).clamp(0, 1) * (1 - lift / 150))

        # the rotating square
        sx, sy, half, angle, spin, colour = self.square
        a = angle + spin * t
        u, v = _rotate(x - sx, y - sy, a)
        image = _paint(image, torch.maximum(u.abs(), v.abs()) - half, colour)

        # the gliding, turning triangle
        tx, ty, r, speed, angle, spin, colour = self.triangle
        cx, a = _wrap(tx + speed * t), angle + spin * t
        edges = [(x - cx) * torch.cos(a + k * 2 * math.pi / 3) + (y - ty) * torch.sin(a + k * 2 * math.pi / 3)
                 for k in range(3)]  # fmt: skip
        image = _paint(image, torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) - r / 2, colour)

        # the bouncing ball, lit from the upper left
        bx, radius, speed, bounce, period, phase, colour = self.ball
        cx, cy = _wrap(bx + speed * t), floor - radius - lift
        dist = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        light = torch.sqrt((x - cx + radius / 3) ** 2 + (y - cy + radius / 3) ** 2) / (1.6 * radius)
        shade = (1.15 - light).clamp(0.35, 1.0)
        image = _paint(image, dist - radius, torch.tensor(colour).view(3, 1, 1, 1) * shade)

        # the scrolling line of text on a band at the top
        scale, band_top = 4, 8
        band = ((y >= band_top) & (y < band_top + 36)).float()
        image = image * (1 - band) + torch.tensor(self.band_colour).view(3, 1, 1, 1) * band
        col = ((x - 0.5 + self.text_speed * t).floor() / scale).floor().long()  # font pixels, whole pixels of scroll
        row = ((y - 0.5 - band_top - 4) / scale).floor().long()
        slot, col = col.div(6, rounding_mode="floor"), col.remainder(6)
        codes = torch.tensor([_CHARS.index(c) for c in self.text])[slot.remainder(len(self.text))]
        lit = _FONT[codes, row.clamp(0, 6), col.clamp(0, 4)] * ((row >= 0) & (row < 7) & (col < 5)).float()
        image = image * (1 - lit) + torch.tensor(self.text_colour).view(3, 1, 1, 1) * lit
        return image.clamp(0, 1) * 2 - 1


def demo_clip(seed: int = DEMO_SEED, frames: int = CLIP_FRAMES) -> torch.Tensor:
    """The generated source clip, (3, frames, 192, 256) in [-1, 1]; seed DEMO_SEED is what the
    shipped latents encode."""
    return Scene.from_seed(seed).render(torch.arange(frames))


def _mix(a, b, w: torch.Tensor) -> torch.Tensor:
    a, b = torch.tensor(a).view(3, 1, 1, 1), torch.tensor(b).view(3, 1, 1, 1)
    return a + (b - a) * w


def _wrap(x: torch.Tensor) -> torch.Tensor:
    """Objects leaving one side come back on the other (with room to be fully outside)."""
    return (x + 40).remainder(CLIP_WIDTH + 80) - 40


def _rotate(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(a), torch.sin(a)
    return u * c + v * s, v * c - u * s


def _paint(image: torch.Tensor, distance: torch.Tensor, colour) -> torch.Tensor:
    """Paint a shape given its signed distance in pixels (negative inside), edges anti-aliased."""
    alpha = (0.5 - distance).clamp(0, 1)
    colour = colour if isinstance(colour, torch.Tensor) else torch.tensor(colour).view(3, 1, 1, 1)
    return image * (1 - alpha) + colour * alpha
