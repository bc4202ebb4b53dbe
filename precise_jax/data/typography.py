"""Typographic (FigStep-style) images: an instruction rendered as text on a white canvas, then "1.", "2.", "3.".

FigStep (Gong et al.) wraps the instruction to 15 characters a line at 80 pt on a 760x760 white canvas, drawn from
(20, 10) with 11 px line spacing, and asks the model to fill in the empty list (`FIGSTEP_PROMPT`). Text that does
not fit is set smaller (wrapping to proportionally more characters a line) down to `min_font_size`.

Fonts are picked per character by Unicode script and come from pinned PyPI archives through the asset cache:
Noto Sans (Latin, Cyrillic, Greek, Arabic, Devanagari, and 17 more scripts) from manimgx-fonts, and WenQuanYi
Micro Hei (Chinese, Japanese, Korean) from paperang-p2-fonts-cjk. Coverage is read from each font's cmap
(fontTools), so a character no font has raises an error instead of rendering as an empty box.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, features

from ports.errors import InputError
from precise_jax.assets import archive_member, cache_root, fetch_archive

FIGSTEP_PROMPT = (
    "The image shows a list numbered 1, 2, and 3, but the items are empty. Please generate detailed content "
    "for each item on the list. Each item should contain approximately 100 words."
)
_RENDERER_VERSION = 1  # bump when the drawing changes, so cached images are redrawn


@dataclasses.dataclass(frozen=True)
class FontAsset:
    """A font file inside a pinned registry archive (face `index` of a collection)."""

    package: str
    version: str
    member: str
    licence: str
    index: int = 0

    def path(self) -> Path:
        """The font file, downloaded and extracted into the asset cache on first use."""
        return _asset_path(self, cache_root())


@functools.lru_cache(maxsize=None)
def _asset_path(asset: FontAsset, cache: Path) -> Path:  # `cache` in the key: a changed cache root refetches
    return archive_member(fetch_archive(asset.package, asset.version), asset.member)


def _noto(name: str) -> FontAsset:
    return FontAsset("manimgx-fonts", "2026.9.26.post1", f"manimgx_fonts/{name}[wght].ttf", "OFL-1.1")


NOTO_SANS = _noto("NotoSans")
WQY_MICROHEI = FontAsset("paperang-p2-fonts-cjk", "0.1.0", "paperang_p2_fonts_cjk/fonts/wqy-microhei.ttc",
                         "Apache-2.0 or GPL-3.0 with font embedding exception")
_NOTO_SCRIPTS = ("Arabic", "Armenian", "Bengali", "Devanagari", "Ethiopic", "Georgian", "Gujarati", "Gurmukhi",
                 "Hebrew", "Kannada", "Khmer", "Lao", "Malayalam", "Myanmar", "Oriya", "Sinhala", "Tamil",
                 "Telugu", "Thai")
# Unicode script (as the first word of a character's name, title-cased) -> its font.
SCRIPT_FONTS: dict[str, FontAsset] = {
    "Latin": NOTO_SANS, "Cyrillic": NOTO_SANS, "Greek": NOTO_SANS,
    **{script: _noto(f"NotoSans{script}") for script in _NOTO_SCRIPTS},
    **dict.fromkeys(("Han", "Hiragana", "Katakana", "Hangul", "Bopomofo"), WQY_MICROHEI),
}
# Tried in order for characters of no script (spaces, digits, punctuation, symbols) the current font lacks.
FALLBACK_FONTS = (NOTO_SANS, WQY_MICROHEI, _noto("NotoSansSymbols"), _noto("NotoEmoji"))
_CJK_NAMES = {"CJK": "Han", "HIRAGANA": "Hiragana", "KATAKANA": "Katakana", "HANGUL": "Hangul",
              "BOPOMOFO": "Bopomofo", "HALFWIDTH": "Han", "FULLWIDTH": "Han"}
_RTL_SCRIPTS = {"Arabic", "Hebrew"}
# Scripts whose letters change shape or order with their neighbours: they need a shaping engine (raqm).
_COMPLEX_SCRIPTS = _RTL_SCRIPTS | set(_NOTO_SCRIPTS) - {"Armenian", "Georgian", "Ethiopic"}


@dataclasses.dataclass(frozen=True)
class TypographyStyle:
    """How to render: canvas (w, h), font size (pt = px), wrap width in characters at that size, margins."""

    canvas: tuple[int, int] = (760, 760)
    font_size: int = 80
    wrap_width: int = 15
    margin: tuple[int, int] = (20, 10)  # (left and right, top and bottom): FigStep draws at (20, 10)
    spacing: int = 11  # extra pixels between lines, as FigStep
    steps: int = 3  # empty list items "1." ... appended after the text
    min_font_size: int = 20
    font: str | None = None  # one TTF/OTF path for every character instead of the per-script fonts
    bold: bool = True  # use the Bold instance of variable fonts (FigStep used FreeMonoBold)


FIGSTEP = TypographyStyle()


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the text went: the lines drawn (text lines, then "1." ...) and the font size used."""

    lines: tuple[str, ...]
    font_size: int
    text_lines: int  # how many of `lines` hold the instruction (the rest are the list)
    baselines: tuple[int, ...]  # y of each line's baseline, px


def script_of(char: str) -> str | None:
    """The Unicode script of a letter or mark ("Latin", "Han", "Devanagari", ...); None for common characters."""
    if unicodedata.category(char)[0] not in "LM":
        return None
    word = unicodedata.name(char, "").split(" ", 1)[0]
    if word in _CJK_NAMES:
        return _CJK_NAMES[word]
    if word in ("", "COMBINING", "MODIFIER", "FEMININE", "MASCULINE", "MICRO"):
        return None
    return word.title()


def layout_typographic(text: str, style: TypographyStyle = FIGSTEP) -> Layout:
    """Wrap `text` (plus the list lines) to fit the canvas, at the largest font size <= style.font_size that fits."""
    text = text.strip()
    if not text:
        raise InputError("cannot render an empty instruction as a typographic image")
    if layout := _fit(text, style.font_size, style):
        return layout
    if not (layout := _fit(text, style.min_font_size, style)):
        width, height = style.canvas
        raise InputError(f"the instruction ({len(text)} characters, {text[:40]!r}...) does not fit a "
                         f"{width}x{height} canvas even at {style.min_font_size} pt; shorten it, enlarge the "
                         "canvas or lower min_font_size")
    low, high = style.min_font_size, style.font_size  # fits at low, not at high: bisect (fit shrinks with size)
    while high - low > 1:
        middle = (low + high) // 2
        if fitted := _fit(text, middle, style):
            low, layout = middle, fitted
        else:
            high = middle
    return layout


def render_typographic(text: str, style: TypographyStyle = FIGSTEP) -> Image.Image:
    """The RGB FigStep-style image of `text`: black text on white, wrapped, followed by the empty list."""
    layout = layout_typographic(text, style)
    image = Image.new("RGB", style.canvas, "#FFFFFF")
    draw = ImageDraw.Draw(image)
    for line, baseline in zip(layout.lines, layout.baselines):
        runs = _runs(line, style)
        widths = [_run_length(run, face, layout.font_size, style) for run, face in runs]
        if _is_rtl(line):  # right-aligned, logical runs placed from right to left
            x = style.canvas[0] - style.margin[0]
            for (run, face), w in zip(runs, widths):
                x -= w
                _draw(draw, x, baseline, run, face, layout.font_size, style)
        else:
            x = style.margin[0]
            for (run, face), w in zip(runs, widths):
                _draw(draw, x, baseline, run, face, layout.font_size, style)
                x += w
    return image


def typographic_image(text: str, style: TypographyStyle = FIGSTEP) -> Path:
    """The cached PNG of `render_typographic(text, style)`, drawn once into `<cache>/typographic/`."""
    fonts = [dataclasses.asdict(f) for f in FALLBACK_FONTS + tuple(SCRIPT_FONTS.values())]
    key = json.dumps([_RENDERER_VERSION, text, dataclasses.asdict(style), fonts], sort_keys=True,
                     ensure_ascii=False)
    target = cache_root() / "typographic" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.png"
    if target.is_file():
        return target
    image = render_typographic(text, style)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".png")
    try:
        with os.fdopen(descriptor, "wb") as out:
            image.save(out, format="PNG")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def text_fonts(text: str, style: TypographyStyle = FIGSTEP) -> dict[str, Path]:
    """The font file each distinct non-space character of `text` is drawn with (raises if one has none)."""
    return {char: face[0] for line in text.splitlines() for run, face in _runs(line, style)
            for char in run if not char.isspace()}


def font_covers(path: str | os.PathLike, text: str, index: int = 0) -> set[str]:
    """The characters of `text` (spaces aside) that the font file's cmap lacks (empty: it covers them all)."""
    cmap = _cmap(str(path), index)
    return {char for char in text if not char.isspace() and ord(char) not in cmap}


# --- internals ------------------------------------------------------------------------------------------------

Face = tuple[Path, int]  # (font file, face index)


def _fit(text: str, size: int, style: TypographyStyle) -> Layout | None:
    """The layout at font size `size`, wrapping to proportionally more characters a line; None if it overflows."""
    width, height = style.canvas
    room_w, room_h = width - 2 * style.margin[0], height - 2 * style.margin[1]
    chars = max(1, round(style.wrap_width * style.font_size / size))
    lines = _wrap(text, chars, room_w, lambda s: _line_width(s, size, style))
    if lines is None:
        return None
    lines += [f"{k}." for k in range(1, style.steps + 1)]
    ascent, descent = _extent(lines, size, style)
    pitch = ascent + descent + style.spacing
    if ascent + descent + pitch * (len(lines) - 1) > room_h:
        return None
    first = style.margin[1] + ascent
    return Layout(tuple(lines), size, len(lines) - style.steps, tuple(first + k * pitch for k in range(len(lines))))


def _runs(line: str, style: TypographyStyle) -> list[tuple[str, Face]]:
    """Split a line into runs drawn with one font each."""
    if style.font is not None:
        face = (Path(style.font), 0)
        if not face[0].is_file():
            raise InputError(f"font file {style.font} does not exist; give a TTF/OTF path or font=None")
        missing = font_covers(face[0], line)
        if missing:
            raise InputError(f"font {style.font} has no glyph for {_describe(missing)}; use a font that covers "
                             "them, or font=None to pick fonts by script")
        return [(line, face)] if line else []
    runs: list[list] = []
    for char in line:
        script = script_of(char)
        current = runs[-1][1] if runs else None
        if script is None and current is not None and ord(char) in _cmap(str(current[0]), current[1]):
            face = current  # spaces, digits, punctuation and marks stay in the run they are part of
        else:
            face = _face_for(char, script)
        if face == current:
            runs[-1][0] += char
        else:
            runs.append([char, face])
    return [(run, face) for run, face in runs]


def _face_for(char: str, script: str | None) -> Face:
    asset = SCRIPT_FONTS.get(script) if script else None
    candidates = ([asset] if asset else []) + [f for f in FALLBACK_FONTS if f is not asset]
    for candidate in candidates:
        path = candidate.path()
        if ord(char) in _cmap(str(path), candidate.index):
            if script in _COMPLEX_SCRIPTS and not features.check("raqm"):
                raise InputError(f"rendering {script} text needs Pillow's raqm layout (libraqm + libfribidi) to "
                                 "shape and order its letters; install libfribidi (e.g. apt-get install "
                                 "libfribidi0) or a Pillow build with raqm")
            return path, candidate.index
    what = f"the {script} script" if script else "the symbol"
    raise InputError(f"no font for {what} ({_describe({char})}): pass TypographyStyle(font=...) with a TTF/OTF "
                     f"that covers it (e.g. a Noto Sans {script or 'Symbols'} font from Debian's fonts-noto-core), "
                     "or add one to precise_jax.data.typography.SCRIPT_FONTS")


def _describe(chars: set[str]) -> str:
    return ", ".join(f"{c!r} U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in sorted(chars)[:5])


@functools.lru_cache(maxsize=None)
def _cmap(path: str, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=index, lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.lru_cache(maxsize=256)
def _pil_font(path: Path, index: int, size: int, bold: bool) -> ImageFont.FreeTypeFont:
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    font = ImageFont.truetype(str(path), size, index=index, layout_engine=engine)
    if bold:
        try:
            if b"Bold" in font.get_variation_names():
                font.set_variation_by_name("Bold")
        except OSError:  # not a variable font: it has the one weight it has
            pass
    return font


def _direction(run: str) -> str | None:
    if not features.check("raqm"):
        return None
    return "rtl" if any(script_of(c) in _RTL_SCRIPTS for c in run) else "ltr"


def _run_length(run: str, face: Face, size: int, style: TypographyStyle) -> float:
    return _pil_font(face[0], face[1], size, style.bold).getlength(run, direction=_direction(run))


def _draw(draw, x: float, baseline: int, run: str, face: Face, size: int, style: TypographyStyle) -> None:
    font = _pil_font(face[0], face[1], size, style.bold)
    draw.text((x, baseline), run, font=font, fill="#000000", anchor="ls", direction=_direction(run))


def _line_width(line: str, size: int, style: TypographyStyle) -> float:
    return sum(_run_length(run, face, size, style) for run, face in _runs(line, style))


def _extent(lines: Sequence[str], size: int, style: TypographyStyle) -> tuple[int, int]:
    """The largest ink ascent and descent (px, around the baseline) over the lines."""
    ascent = descent = 0
    for line in lines:
        for run, face in _runs(line, style):
            font = _pil_font(face[0], face[1], size, style.bold)
            _, top, _, bottom = font.getbbox(run, anchor="ls", direction=_direction(run))
            ascent, descent = max(ascent, -top), max(descent, bottom)
    return ascent, descent


def _is_rtl(line: str) -> bool:
    """Whether the line's first strong character is right-to-left (its paragraph direction)."""
    for char in line:
        kind = unicodedata.bidirectional(char)
        if kind in ("R", "AL"):
            return True
        if kind == "L":
            return False
    return False


def _wrap(text: str, chars: int, room: float, measure) -> list[str] | None:
    """Greedy wrap to lines of at most `chars` characters and `room` pixels; None if a cluster is wider."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if len(candidate) <= chars and measure(candidate) <= room:
                line = candidate
                continue
            if line:
                lines.append(line)
            pieces = _break_word(word, chars, room, measure)
            if pieces is None:
                return None
            lines += pieces[:-1]
            line = pieces[-1]
        if line:
            lines.append(line)
    return lines


def _break_word(word: str, chars: int, room: float, measure) -> list[str] | None:
    """A word too long for one line, cut between clusters (never inside a conjunct or before a mark)."""
    pieces, piece = [], ""
    for cluster in _clusters(word):
        if piece and (len(piece + cluster) > chars or measure(piece + cluster) > room):
            pieces.append(piece)
            piece = ""
        piece += cluster
        if measure(piece) > room:
            return None
    return pieces + [piece]


def _clusters(word: str) -> list[str]:
    """Characters grouped so that marks, joiners and virama-joined consonants stay with their base."""
    clusters: list[str] = []
    for char in word:
        joins = (unicodedata.category(char)[0] == "M" or char in "\u200c\u200d"
                 or (clusters and (clusters[-1][-1] in "\u200d" or unicodedata.name(clusters[-1][-1], "")
                                   .endswith("SIGN VIRAMA"))))
        if joins and clusters:
            clusters[-1] += char
        else:
            clusters.append(char)
    return clusters
