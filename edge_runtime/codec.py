"""Update codec: a float32 delta vector <-> a compact, self-describing, versioned body (bytes).

A device sends `delta = local_params - global_params`. At 8 or 4 bits the vector is cut into blocks
of `block_size` values; each block stores one float32 step `s = max|x| / L` (L = 127 or 7) and
integers `q` in [-L, L] with `x ~ q * s`. Rounding is stochastic: `q = floor(x/s) + 1` with
probability `frac(x/s)`, so E[q * s] = x and the coordinator's average of many updates carries no
rounding bias; every element is off by less than one step. 4-bit levels are packed two per byte
(element 2i in the low nibble). `bits=32` is raw little-endian float32, for comparisons.
What rounding drops, `ErrorFeedback` keeps on the device and adds back to the next round's delta.

Body = header + payload, all little-endian:

    magic "FHUQ" | version u8 | bits u8 | flags u8 | reserved u8 (0)
    | block_size u32 (0 at 32 bits) | n u32 | n_blocks u32 (0 at 32 bits) | crc32 u32
    payload = scales (n_blocks float32) + packed values; zstd-compressed when flags has FLAG_ZSTD.

The CRC covers the header (without itself) and the payload as sent, so any corruption is caught
before decompression. `decode` checks every field and length, bounds the decompressed size before
decompressing, and raises `CodecError` (never anything else) instead of returning a wrong vector.
The CRC is not a signature: who sent a body is the update signature's business, not the codec's.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import zstandard
from numba import njit

from edge_runtime.errors import EdgeError

CODEC_VERSION = 1
MAGIC = b"FHUQ"
SUPPORTED_BITS = (4, 8, 32)
DEFAULT_BLOCK_SIZE = 256
MIN_BLOCK_SIZE = 8
MAX_BLOCK_SIZE = 1 << 16
DEFAULT_MAX_BYTES = 64 << 20  # 16M float32 parameters: far above any on-device model
FLAG_ZSTD = 0x01
ZSTD_LEVEL = 1  # on these payloads level 3 saves 2% more bytes for 3x the compression time

_HEADER = struct.Struct("<4sBBBBIIII")
HEADER_SIZE = _HEADER.size
_ZSTD_UNKNOWN_SIZE = 2**64 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Bit generators whose raw output is 64 random bits; others (MT19937: 32) go through Generator.integers.
_RAW64_BIT_GENERATORS = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)


class CodecError(EdgeError):
    """An update that cannot be encoded, or a body that does not decode to a trustworthy vector."""


def levels(bits: int) -> int:
    """Largest integer level L at 8 or 4 bits (symmetric: levels run from -L to L): 127 and 7."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise CodecError("FHAI-C012", f"quantization levels exist at 4 or 8 bits, not {bits!r}")
    return 2 ** (bits - 1) - 1


def n_blocks_for(n: int, block_size: int) -> int:
    return -(-n // block_size)


def packed_size(n: int, bits: int) -> int:
    """Bytes of packed values for n parameters."""
    return n * 4 if bits == 32 else n if bits == 8 else (n + 1) // 2


def max_block_error(delta: np.ndarray, bits: int, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """Per block, the bound on |decoded - delta| for any element of it: one step, max|x| / L (0 at 32 bits)."""
    x = _check_delta(delta)
    _check_bits(bits)
    _check_block_size(block_size)
    nb = n_blocks_for(x.size, block_size)
    if bits == 32:
        return np.zeros(nb, np.float32)
    padded = np.zeros(nb * block_size, np.float32)
    padded[: x.size] = np.abs(x)
    return (padded.reshape(nb, block_size).max(axis=1) / np.float32(levels(bits))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _absmax(xs: np.ndarray) -> np.float32:
    """max |xs| for finite xs; four accumulators break the dependency chain (about 3x faster)."""
    m0 = m1 = m2 = m3 = np.float32(0.0)
    k = xs.shape[0] // 4 * 4
    for i in range(0, k, 4):
        a0, a1, a2, a3 = abs(xs[i]), abs(xs[i + 1]), abs(xs[i + 2]), abs(xs[i + 3])
        m0 = a0 if a0 > m0 else m0
        m1 = a1 if a1 > m1 else m1
        m2 = a2 if a2 > m2 else m2
        m3 = a3 if a3 > m3 else m3
    for i in range(k, xs.shape[0]):
        a0 = abs(xs[i])
        m0 = a0 if a0 > m0 else m0
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True, nogil=True)
def _quantize(
    x: np.ndarray, u: np.ndarray, block: int, top: int, smax: np.float32, scales: np.ndarray, q: np.ndarray
) -> None:
    """Blockwise stochastic rounding of x to integers in [-top, top]; u holds one uniform uint32 per element.

    Steps are capped at `smax` so that top * step stays a finite float32 (matters only near 3.4e38).
    """
    n = x.shape[0]
    ftop = np.float64(top)
    for b in range(scales.shape[0]):
        lo = b * block
        hi = min(lo + block, n)
        xs, us, qs = x[lo:hi], u[lo:hi], q[lo:hi]  # slices let LLVM vectorize the loop below
        m = _absmax(xs)
        s = np.float32(m / np.float32(top))
        # Round the step up when float32 rounding put max|x| / s above `top` (or flushed s to 0):
        # then no element needs clipping, which would bias it.
        while np.float64(s) * ftop < np.float64(m) and s < smax:
            s = np.nextafter(s, np.float32(np.inf))
        s = min(s, smax)
        scales[b] = s
        inv = 1.0 / np.float64(s) if s > 0 else 0.0
        for i in range(hi - lo):
            y = np.float64(xs[i]) * inv
            f = np.floor(y)
            # P(u < frac * 2^32) = frac to within 2^-32, so E[q] = y.
            r = f + (us[i] < (y - f) * 4294967296.0)
            qs[i] = np.int8(min(max(r, -ftop), ftop))  # only float64 error can reach past top


@njit(cache=True, nogil=True)
def _pack_nibbles(q: np.ndarray, out: np.ndarray) -> None:
    """Element 2j in the low nibble of out[j], 2j+1 in the high nibble (two's complement)."""
    half = q.shape[0] // 2
    for j in range(half):
        out[j] = np.uint8((q[2 * j] & 0xF) | ((q[2 * j + 1] & 0xF) << 4))
    if q.shape[0] % 2:
        out[half] = np.uint8(q[2 * half] & 0xF)


@njit(cache=True, nogil=True)
def _unpack_nibbles(packed: np.ndarray, out: np.ndarray) -> None:
    """Inverse of _pack_nibbles: ((nibble ^ 8) - 8) sign-extends a 4-bit two's complement value."""
    half = out.shape[0] // 2
    for j in range(half):
        p = np.int32(packed[j])
        out[2 * j] = np.int8(((p & 0xF) ^ 8) - 8)
        out[2 * j + 1] = np.int8(((p >> 4) ^ 8) - 8)
    if out.shape[0] % 2:
        out[2 * half] = np.int8(((np.int32(packed[half]) & 0xF) ^ 8) - 8)


@njit(cache=True, nogil=True)
def _scale_levels(q: np.ndarray, scales: np.ndarray, block: int, forbidden: int, out: np.ndarray) -> int:
    """out = q * step of its block; returns how many q equal `forbidden` (the level outside [-L, L])."""
    n = q.shape[0]
    bad = 0
    for b in range(scales.shape[0]):
        lo = b * block
        hi = min(lo + block, n)
        qs, outs = q[lo:hi], out[lo:hi]
        s = scales[b]
        for i in range(hi - lo):
            bad += qs[i] == forbidden
            outs[i] = np.float32(qs[i]) * s
    return bad


# ----------------------------------------------------------------------------------------------- encode


def encode(
    delta: np.ndarray,
    bits: int,
    rng: np.random.Generator,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compress: bool = False,
) -> bytes:
    """The body for a float32 delta at 4, 8 or 32 bits, optionally zstd-compressed.

    `rng` (a seeded numpy Generator) draws the stochastic rounding: the same seed gives the same body.
    """
    x = _check_delta(delta)
    _check_bits(bits)
    if not isinstance(rng, np.random.Generator):
        raise CodecError("FHAI-C012", f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng)}")
    if bits != 32:
        _check_block_size(block_size)
    block, nb = (0, 0) if bits == 32 else (int(block_size), n_blocks_for(x.size, int(block_size)))
    # Quantize straight into the body's buffer: no copy of the values after the kernel.
    body = np.empty(HEADER_SIZE + 4 * nb + packed_size(x.size, bits), np.uint8)
    payload = body[HEADER_SIZE:]
    if bits == 32:
        payload[:] = x.astype("<f4", copy=False).view(np.uint8)
    else:
        scales = np.empty(nb, np.float32)
        values = payload[4 * nb :]
        q = values.view(np.int8) if bits == 8 else np.empty(x.size, np.int8)
        top = levels(bits)
        _quantize(x, _uniform_u32(rng, x.size), block, top, _max_step(top), scales, q)
        if bits == 4:
            _pack_nibbles(q, values)
        payload[: 4 * nb] = scales.astype("<f4", copy=False).view(np.uint8)
    head = _HEADER.pack(MAGIC, CODEC_VERSION, bits, FLAG_ZSTD if compress else 0, 0, block, x.size, nb, 0)[:-4]
    if compress:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(payload.data)
        return head + struct.pack("<I", zlib.crc32(packed, zlib.crc32(head))) + packed
    crc = zlib.crc32(payload.data, zlib.crc32(head))
    body[:HEADER_SIZE] = np.frombuffer(head + struct.pack("<I", crc), np.uint8)
    return body.tobytes()


def _max_step(top: int) -> np.float32:
    """The largest float32 step s with top * s <= float32 max: every decoded q * s is then finite."""
    s = np.float32(_FLOAT32_MAX / top)
    while float(s) * top > _FLOAT32_MAX:
        s = np.nextafter(s, np.float32(0))
    return s


def _uniform_u32(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform uint32 from rng; raw 64-bit draws split in two are twice as fast as Generator.integers."""
    if isinstance(rng.bit_generator, _RAW64_BIT_GENERATORS):
        return rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    return rng.integers(0, 2**32, size=n, dtype=np.uint32)


def _check_delta(delta: np.ndarray) -> np.ndarray:
    if not isinstance(delta, np.ndarray):
        raise CodecError("FHAI-C011", f"the delta must be a numpy array, got {type(delta).__name__}")
    if delta.dtype != np.float32 or delta.ndim != 1:
        raise CodecError(
            "FHAI-C011",
            f"the delta must be a flat float32 vector (the model's parameter layout), got {delta.dtype} "
            f"with shape {delta.shape}",
        )
    if not 1 <= delta.size <= 0xFFFFFFFF:
        raise CodecError("FHAI-C011", f"the delta must have 1 to 2^32-1 parameters, got {delta.size}")
    if not np.isfinite(delta).all():
        raise CodecError(
            "FHAI-C011",
            f"the delta has {int((~np.isfinite(delta)).sum())} NaN or infinite values: training diverged, "
            "lower the learning rate in the device profile",
        )
    return np.ascontiguousarray(delta)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CodecError("FHAI-C012", f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise CodecError("FHAI-C012", f"block_size must be an integer, got {block_size!r}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise CodecError("FHAI-C012", f"block_size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}")


# ----------------------------------------------------------------------------------------------- decode


def decode(
    body: bytes | bytearray | memoryview,
    expected_n: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    check_crc: bool = True,
) -> np.ndarray:
    """The float32 vector in `body`, after checking everything; raises CodecError on any inconsistency.

    `expected_n` is the parameter count of the round's model; `max_bytes` bounds the body, the
    decompressed payload and the decoded vector, so a small body cannot make the decoder allocate much.
    `check_crc=False` only where a verified signature already covers these exact bytes (the coordinator's
    update path): it cannot catch anything the signature did not, and costs a pass over the body.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise CodecError("FHAI-C001", f"an update body is bytes, got {type(body).__name__}")
    view = memoryview(body).cast("B")
    if view.nbytes > max_bytes:
        raise CodecError("FHAI-C010", f"body of {view.nbytes} bytes exceeds the limit of {max_bytes} bytes")
    if view.nbytes < HEADER_SIZE:
        raise CodecError(
            "FHAI-C001", f"body of {view.nbytes} bytes is shorter than the {HEADER_SIZE}-byte header: truncated?"
        )
    magic, version, bits, flags, reserved, block, n, nb, crc = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("FHAI-C001", f"not an FH-AI update body (magic {magic!r}, expected {MAGIC!r})")
    if version != CODEC_VERSION:
        raise CodecError(
            "FHAI-C002",
            f"codec version {version} is not supported (this runtime reads version {CODEC_VERSION}): "
            "update the edge runtime or coordinator so both speak the same version",
        )
    if flags & ~FLAG_ZSTD or reserved:
        raise CodecError("FHAI-C002", f"unknown header flags {flags:#04x}/{reserved:#04x}: written by a newer codec?")
    if bits not in SUPPORTED_BITS:
        raise CodecError("FHAI-C003", f"header says {bits} bits; supported: {SUPPORTED_BITS}")
    if n == 0:
        raise CodecError("FHAI-C005", "header says the update has 0 parameters")
    if expected_n is not None and n != expected_n:
        raise CodecError(
            "FHAI-C005",
            f"update has {n} parameters but the round's model has {expected_n}: the device trained "
            "another model; it must pull the current global model",
        )
    if bits == 32:
        if block != 0 or nb != 0:
            raise CodecError("FHAI-C004", f"a 32-bit body has no blocks, header says block {block}, {nb} blocks")
    else:
        if not MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE:
            raise CodecError(
                "FHAI-C004", f"block size {block} outside [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]: corrupt header"
            )
        if nb != n_blocks_for(n, block):
            raise CodecError(
                "FHAI-C004",
                f"header says {nb} blocks, but {n} parameters in blocks of {block} make {n_blocks_for(n, block)}",
            )
    payload_size = 4 * nb + packed_size(n, bits)
    if payload_size > max_bytes or 4 * n > max_bytes:
        raise CodecError(
            "FHAI-C010", f"{n} parameters would decode to {4 * n} bytes, over the limit of {max_bytes} bytes"
        )
    payload = view[HEADER_SIZE:]
    if check_crc and zlib.crc32(payload, zlib.crc32(view[: HEADER_SIZE - 4])) != crc:
        raise CodecError("FHAI-C008", "body checksum mismatch: the update was corrupted in transit; resend it")
    if flags & FLAG_ZSTD:
        payload = memoryview(_decompress(payload, payload_size))
    elif payload.nbytes != payload_size:
        raise CodecError(
            "FHAI-C001",
            f"payload is {payload.nbytes} bytes, {n} parameters at {bits} bits need {payload_size}: truncated?",
        )
    if bits == 32:
        out = np.frombuffer(payload, "<f4").astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError("FHAI-C007", "the 32-bit update contains NaN or infinite values")
        return out
    return _dequantize(payload, bits, block, n, nb)


def _decompress(data: memoryview, expected: int) -> bytes:
    """Decompress one zstd frame that must declare exactly `expected` bytes (the bomb guard)."""
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise CodecError("FHAI-C009", f"payload is not a zstd frame: {exc}") from exc
    if declared != expected:
        shown = "no size" if declared == _ZSTD_UNKNOWN_SIZE else f"{declared} bytes"
        raise CodecError("FHAI-C009", f"zstd frame declares {shown}, the header implies {expected} bytes")
    # Our frames are single-segment (window = content size); refusing larger windows bounds memory too.
    window = 1 << max(10, (expected - 1).bit_length())
    try:
        out = zstandard.ZstdDecompressor(max_window_size=window).decompress(
            data, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError("FHAI-C009", f"zstd payload does not decompress: {exc}") from exc
    if len(out) != expected:
        raise CodecError("FHAI-C009", f"zstd payload decompressed to {len(out)} bytes, expected {expected}")
    return out


def _dequantize(payload: memoryview, bits: int, block: int, n: int, nb: int) -> np.ndarray:
    scales = np.frombuffer(payload, "<f4", count=nb).astype(np.float32)
    top = levels(bits)
    ok = np.isfinite(scales) & (scales >= 0) & (scales <= _max_step(top))
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise CodecError(
            "FHAI-C006", f"block {bad} has scale {scales[bad]!r}: scales must be finite, >= 0 and keep q * s finite"
        )
    if bits == 8:
        q = np.frombuffer(payload, np.int8, offset=4 * nb)
    else:
        packed = np.frombuffer(payload, np.uint8, offset=4 * nb)
        if n % 2 and packed[-1] >> 4:
            raise CodecError("FHAI-C007", "the padding nibble after the last 4-bit value is not zero")
        q = np.empty(n, np.int8)
        _unpack_nibbles(packed, q)
    out = np.empty(n, np.float32)
    n_bad = _scale_levels(q, scales, block, -top - 1, out)
    if n_bad:
        raise CodecError(
            "FHAI-C007", f"{n_bad} values use level {-top - 1}, outside the symmetric range [-{top}, {top}]"
        )
    return out


# --------------------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """What quantization dropped from past updates, added back to the next delta; lives on the device.

    Per round: `c = ef.compensate(delta)`, `body = encode(c, ...)`, `ef.update(c, decode(body))`. The
    sum of what the coordinator received then trails the sum of the true deltas by exactly the
    residual, which stays under one quantization step instead of drifting like a random walk.
    """

    def __init__(self, residual: np.ndarray) -> None:
        self.residual = _check_state(residual, "residual").copy()

    @classmethod
    def zeros(cls, n: int) -> ErrorFeedback:
        return cls(np.zeros(n, np.float32))

    @property
    def n(self) -> int:
        return int(self.residual.size)

    def compensate(self, delta: np.ndarray) -> np.ndarray:
        """delta + residual, as a new float32 vector."""
        x = _check_state(delta, "delta", self.n)
        return x + self.residual

    def update(self, compensated: np.ndarray, decoded: np.ndarray) -> None:
        """Keep what this round's body did not carry: residual = compensated - decoded."""
        c = _check_state(compensated, "compensated delta", self.n)
        d = _check_state(decoded, "decoded update", self.n)
        self.residual = c - d

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the residual as .npy (no pickle); atomic, so a crash leaves the previous state."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.residual, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_n: int | None = None) -> ErrorFeedback:
        """Read a residual saved by `save`; raises CodecError if it is unreadable or of another model."""
        try:
            residual = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CodecError(
                "FHAI-C013",
                f"cannot read the error-feedback state {path}: {exc}; delete it to restart from zero residual",
            ) from exc
        if not isinstance(residual, np.ndarray):  # an .npz archive
            residual.close()
            raise CodecError("FHAI-C013", f"{path} is not a single .npy array; delete it to restart from zero")
        return cls(_check_state(residual, f"residual in {path}", expected_n))


def _check_state(x: np.ndarray, what: str, n: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1:
        shape = getattr(x, "shape", None)
        raise CodecError(
            "FHAI-C013", f"the {what} must be a flat float32 vector, got {getattr(x, 'dtype', type(x))} {shape}"
        )
    if n is not None and x.size != n:
        raise CodecError(
            "FHAI-C013",
            f"the {what} has {x.size} parameters, expected {n}: the model changed; "
            "start a fresh ErrorFeedback.zeros(n) for the new model",
        )
    if not np.isfinite(x).all():
        raise CodecError("FHAI-C013", f"the {what} contains NaN or infinite values")
    return x


__all__ = [
    "CODEC_VERSION",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_BYTES",
    "CodecError",
    "ErrorFeedback",
    "decode",
    "encode",
    "levels",
    "max_block_error",
]
