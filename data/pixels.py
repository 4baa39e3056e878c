"""An image's size from its header, read without decoding: the pixel-count limit
(--max_image_pixels) is applied before any full decode.

A small file can decode to a huge image (a 20000x20000 single-colour PNG is under 1 MB on disk
and 1.2 GB as RGB uint8, 4.8 GB as the float32 the resize makes of it): decoding it in the data
check or a cache gets the process killed for memory, with no message. The header of JPEG, PNG,
GIF, BMP and WebP states the size; `header_size` reads it (a few hundred bytes, more for a JPEG
with large metadata segments before its frame header) and `over_limit` says why a file is left
out. Pure Python, no TensorFlow (data/check.py runs it before it imports TensorFlow; trainer/
config.py takes the default from here).
"""
from __future__ import annotations

import struct

# 100 megapixels: a 10000x10000 photo; larger images are not training data for an image
# classifier (its input is a few hundred pixels a side) and cost 0.3 GB as uint8 RGB, 1.2 GB
# as float32 while resizing, per image decoded in parallel. PIL warns at 89 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

# JPEG start-of-frame markers (the frame header holds height and width): C0-CF but C4 (DHT),
# C8 (reserved) and CC (DAC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_SEGMENTS = 1000  # a file with more segments before its frame is not read further


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    for _ in range(_JPEG_MAX_SEGMENTS):
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01,) or 0xD0 <= marker <= 0xD9:  # markers without a length
            continue
        head = f.read(2)
        if len(head) < 2:
            return None
        length = struct.unpack(">H", head)[0]
        if marker in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        if length < 2:
            return None
        f.seek(length - 2, 1)
        if f.read(1) != b"\xff":  # the next marker must follow the segment
            return None
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = struct.unpack("<I", head[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) stated by the header of the image file at `path`, or None when the
    format is not one of these or the header is cut short (the decoder then says what is
    wrong). Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\xff\xd8\xff"):
            return _jpeg_size(f)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"BM") and len(head) >= 26:
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", head[18:22])
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)  # a negative height is a top-down BMP
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_size(head)
    return None


def describe_over_limit(width: int, height: int, max_pixels: int) -> str:
    """The bad-file reason of an image over the limit."""
    return (f"image of {width}x{height} = {width * height:,} pixels is over "
            f"--max_image_pixels={max_pixels:,} (not decoded: it would need "
            f"{width * height * 3 / 1e9:.1f} GB as RGB)")


def over_limit(path: str, max_pixels: int | None) -> str | None:
    """The reason the file at `path` is left out under `max_pixels` (None: within the limit,
    no limit, or a header this module cannot read, which the decoder then judges)."""
    if not max_pixels:
        return None
    try:
        size = header_size(path)
    except OSError:
        return None  # the decoder reports the unreadable file
    if size is None or size[0] * size[1] <= max_pixels:
        return None
    return describe_over_limit(size[0], size[1], max_pixels)
