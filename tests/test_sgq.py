"""edgelearn.sgq: round trips within the quantization bound, frame sizes, SGQ vs uniform error, the
Codec, every FrameError case (a corpus of hand-made bad frames) and argument errors."""

import struct
import zlib

import numpy as np
import pytest

import edgelearn
from edgelearn import sgq

HEADER = sgq.HEADER_BYTES


def features(rng, n=8, c=16, h=16, w=16):
    """Post-ReLU activations with per-channel scales spanning two orders of magnitude."""
    scales = np.geomspace(0.05, 5.0, c).astype(np.float32)
    rng.shuffle(scales)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32) * scales[None, :, None, None]
    return np.maximum(x, 0)


def f16_outward(lo, hi):
    lo16 = np.float16(lo)
    if np.float32(lo16) > lo:
        lo16 = np.nextafter(lo16, np.float16(-np.inf))
    hi16 = np.float16(hi)
    if np.float32(hi16) < hi:
        hi16 = np.nextafter(hi16, np.float16(np.inf))
    return np.float32(lo16), np.float32(hi16)


def reseal(frame):
    b = bytearray(frame)
    crc = zlib.crc32(bytes(b[:52]) + bytes(b[56:])) & 0xFFFFFFFF
    b[52:56] = struct.pack("<I", crc)
    return bytes(b)


def edit(frame, offset, fmt, *values, seal=True):
    b = bytearray(frame)
    struct.pack_into(fmt, b, offset, *values)
    return reseal(b) if seal else bytes(b)


# ---------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_round_trip_is_within_half_a_step(rng, bits):
    x = rng.standard_normal((3, 5, 7, 6)).astype(np.float32)
    y = sgq.decode(sgq.encode(x, bits=bits, mode="uniform"))
    lo, hi = f16_outward(x.min(), x.max())
    bound = (hi - lo) / (2**bits - 1) / 2
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() <= bound * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_sgq_round_trip_is_within_the_block_bound(rng, bits, rounding):
    x = features(rng, n=2, c=6, h=8, w=5)
    frame = sgq.encode(x, bits=bits, group=3, stripe_rows=2, rounding=rounding, seed=7)
    y = sgq.decode(frame)
    # per-block bound from the order SGQ used (the frame carries it) and the blocks' outward f16 ranges
    order = sgq.channel_order(x)
    levels = 2**bits - 1
    for n in range(2):
        for g in range(2):
            chans = order[3 * g : 3 * g + 3]
            for s in range(4):
                blk = x[n, chans, 2 * s : 2 * s + 2]
                lo, hi = f16_outward(blk.min(), blk.max())
                step = (hi - lo) / levels
                err = np.abs(y[n, chans, 2 * s : 2 * s + 2] - blk).max()
                bound = step / 2 if rounding == "nearest" else step
                assert err <= bound * (1 + 1e-5) + 1e-6


def test_2d_and_3d_inputs_keep_their_shape(rng):
    for shape in [(4, 10), (3, 8, 12)]:
        x = rng.standard_normal(shape).astype(np.float32)
        frame = sgq.encode(x)
        assert sgq.decode(frame).shape == shape
        info = sgq.frame_info(frame)
        assert info["shape"] == shape
    assert sgq.frame_info(sgq.encode(rng.standard_normal((3, 8, 12)).astype(np.float32)))["stripe_rows"] == 3


def test_fp16_mode_matches_numpy_float16(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 100
    frame = sgq.encode(x, mode="fp16")
    assert len(frame) == HEADER + 2 * x.size
    np.testing.assert_array_equal(sgq.decode(frame), x.astype(np.float16).astype(np.float32))


def test_constant_tensor_round_trips_exactly():
    x = np.full((2, 4, 4, 4), 0.25, np.float32)
    for mode in sgq.MODES:
        np.testing.assert_array_equal(sgq.decode(sgq.encode(x, mode=mode)), x)


def test_stochastic_frames_are_reproducible_for_a_seed(rng):
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    a = sgq.encode(x, rounding="stochastic", seed=3)
    assert a == sgq.encode(x, rounding="stochastic", seed=3)
    assert a != sgq.encode(x, rounding="stochastic", seed=4)


def test_input_is_converted_from_float64_and_noncontiguous(rng):
    x = rng.standard_normal((2, 4, 8, 8))
    a = sgq.encode(x)
    assert a == sgq.encode(np.ascontiguousarray(x, dtype=np.float32))
    xt = np.asfortranarray(x.astype(np.float32))
    assert sgq.encode(xt) == a
    assert sgq.decode(bytearray(a)).shape == x.shape
    assert sgq.decode(memoryview(a)).shape == x.shape


# ---------------------------------------------------------------------------------------------------
# sizes and quality
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_frame_size_is_bits_per_element_plus_small_overhead(rng, bits):
    x = features(rng, n=8, c=32, h=16, w=16)
    frame = sgq.encode(x, bits=bits)
    info = sgq.frame_info(frame)
    assert info["codes_bytes"] == x.size * bits // 8
    assert info["frame_bytes"] == len(frame)
    groups, stripes = 32 // 4, 16 // 4
    assert info["ranges_bytes"] == 4 * 8 * groups * stripes
    assert info["permutation_bytes"] in (0, 2 * 32)
    per_element = len(frame) / x.size
    assert bits / 8 < per_element < bits / 8 * 1.1


def test_sgq_4bit_beats_uniform_4bit_with_ranges_as_the_only_extra_bytes(rng):
    x = features(rng, n=16, c=32, h=16, w=16)
    s = sgq.encode(x, bits=4)
    u = sgq.encode(x, bits=4, mode="uniform")
    err = lambda f: np.linalg.norm(sgq.decode(f) - x) / np.linalg.norm(x)
    # same 4-bit code budget; SGQ's side information (ranges, order) is < 5% of the frame
    assert len(s) <= len(u) * 1.05
    assert err(s) < err(u) / 3, (err(s), err(u))
    # ranges per frame: the extra bytes are 4 per (group, stripe) minus uniform's one range, and the
    # order once; the error is still far below uniform's
    f = sgq.encode(x, bits=4, ranges="frame", send_order=False)
    groups, stripes = 32 // 4, 16 // 4
    assert len(f) - len(u) == 4 * groups * stripes - 4
    rel = np.linalg.norm(sgq.decode(f, order=sgq.channel_order(x)) - x) / np.linalg.norm(x)
    assert rel < err(u) / 1.5, (rel, err(u))
    # and at fewer bits: SGQ 3-bit (smaller frame than uniform 4-bit) still wins
    s3 = sgq.encode(x, bits=3)
    assert len(s3) < len(u) and err(s3) < err(u)


def test_frame_ranges_are_shared_by_the_samples(rng):
    x = features(rng, n=4, c=8, h=8, w=8)
    frame = sgq.encode(x, ranges="frame")
    info = sgq.frame_info(frame)
    assert info["ranges"] == "frame" and info["ranges_bytes"] == 4 * 2 * 4
    y = sgq.decode(frame)
    # every block's range covers all samples: the bound is the frame-wide block width
    order = info["order_list"] or list(range(8))
    xp, yp = x[:, order], y[:, order]
    for k in range(2):
        for s_ in range(4):
            blk = (slice(None), slice(4 * k, 4 * k + 4), slice(2 * s_, 2 * s_ + 2))
            lo, hi = f16_outward(xp[blk].min(), xp[blk].max())
            assert np.abs(yp[blk] - xp[blk]).max() <= (hi - lo) / 15 / 2 * (1 + 1e-5) + 1e-6
    with pytest.raises(ValueError, match="ranges"):
        sgq.encode(x, mode="uniform", ranges="frame")
    with pytest.raises(ValueError, match="ranges"):
        sgq.encode(x, ranges="block")


def test_channel_order_groups_similar_scales(rng):
    x = features(rng, n=4, c=16, h=8, w=8)
    order = sgq.channel_order(x)
    assert sorted(order) == list(range(16))
    widths = x.max(axis=(0, 2, 3)) - x.min(axis=(0, 2, 3))
    assert np.all(np.diff(widths[order]) >= 0)


# ---------------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------------


def test_codec_keeps_its_order_and_refreshes(rng):
    x = features(rng, n=2, c=8, h=8, w=8)
    codec = sgq.Codec(bits=4, refresh_every=None)
    f1 = codec.encode(x)
    kept = list(codec.order)
    x2 = x[:, ::-1].copy()
    codec.encode(x2)
    assert codec.order == kept  # not refreshed
    assert np.abs(codec.decode(f1) - x).max() < x.max() / 15
    codec.update_order(x2)
    assert codec.order == sgq.channel_order(x2)
    every = sgq.Codec(refresh_every=1)
    every.encode(x)
    every.encode(x2)
    assert every.order == sgq.channel_order(x2)
    assert "Codec(bits=4" in repr(codec)


def test_codec_stochastic_frames_differ_per_frame_but_are_reproducible(rng):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    a, b = sgq.Codec(rounding="stochastic", seed=1), sgq.Codec(rounding="stochastic", seed=1)
    fa = [a.encode(x) for _ in range(2)]
    fb = [b.encode(x) for _ in range(2)]
    assert fa == fb and fa[0] != fa[1]


def test_codec_sends_the_order_only_when_it_changes(rng):
    x = features(rng, n=2, c=8, h=8, w=8)
    x2 = x[:, ::-1].copy()
    tx, rx = sgq.Codec(bits=4, refresh_every=2), sgq.Codec(bits=4)
    frames = [tx.encode(v) for v in (x, x, x2, x2)]
    kinds = [sgq.frame_info(f)["order"] for f in frames]
    # frame 0 carries the order, frame 1 reuses it, frame 2 refreshes it (reversed data: a new order)
    assert kinds[0] == "frame" and kinds[1] == "stream" and kinds[2] == "frame" and kinds[3] == "stream"
    assert len(frames[1]) == len(frames[0]) - 2 * 8
    for f, v in zip(frames, (x, x, x2, x2)):
        assert np.abs(rx.decode(f) - v).max() <= v.max() / 15
        assert np.array_equal(tx.decode_sent(f), sgq.decode(f, order=tx.order))
    assert rx.received_order == tx.order
    # a receiver that missed the frame with the order cannot decode the next one
    with pytest.raises(sgq.FrameError, match="no channel order"):
        sgq.Codec().decode(frames[1])
    # every frame self-contained on request
    always = sgq.Codec(send_order="always")
    assert all(sgq.frame_info(always.encode(x))["order"] == "frame" for _ in range(3))


def test_decode_of_a_stream_order_frame_needs_the_order(rng):
    x = features(rng, n=2, c=6, h=4, w=4)
    order = sgq.channel_order(x)
    assert order != list(range(6))
    frame = sgq.encode(x, order=order, send_order=False)
    info = sgq.frame_info(frame)
    assert info["order"] == "stream" and not info["permutation"] and info["permutation_bytes"] == 0
    with pytest.raises(sgq.FrameError, match="carries no channel order"):
        sgq.decode(frame)
    with pytest.raises(sgq.FrameError, match="permutation of 0..6"):
        sgq.decode(frame, order=[0, 1, 2, 3, 4])
    with pytest.raises(sgq.FrameError, match="permutation of 0..6"):
        sgq.decode(frame, order=[0, 1, 2, 3, 4, 4])
    assert np.array_equal(sgq.decode(frame, order=order), sgq.decode(sgq.encode(x, order=order)))
    # the identity order needs nothing from the stream
    ident = sgq.encode(x, order=list(range(6)), send_order=False)
    assert sgq.frame_info(ident)["order"] == "identity"
    sgq.decode(ident)


def zero_row_features(rng, n=4, c=6, h=8, w=8):
    """ReLU-like features whose first three rows are zero in every channel (an image's empty border)."""
    x = features(rng, n=n, c=c, h=h, w=w)
    x[:, :, :3] = 0
    return x


def test_constant_blocks_carry_one_code(rng):
    x = zero_row_features(rng)
    kw = dict(bits=4, group=1, stripe_rows=1, ranges="frame")
    plain, mapped = sgq.encode(x, **kw), sgq.encode(x, constant_blocks=True, **kw)
    info = sgq.frame_info(mapped)
    # 4 samples x 6 channels x 8 rows = 192 blocks: a 24-byte map; 72 zero rows of 8 elements keep 1 code
    assert info["constant_map"] and info["map_bytes"] == 24 and info["constant_blocks"] >= 72
    saved_codes = info["constant_blocks"] * (8 - 1)
    assert info["codes_bytes"] == (x.size - saved_codes) * 4 // 8
    assert len(plain) - len(mapped) == saved_codes * 4 // 8 - 24
    y = sgq.decode(mapped)
    assert np.array_equal(y, sgq.decode(plain))
    assert np.all(y[:, :, :3] == 0)
    # the Codec with constant blocks, per-frame ranges and groups of one channel: identity order, no permutation
    codec = sgq.Codec(bits=4, group=1, stripe_rows=1, ranges="frame", constant_blocks=True)
    f = codec.encode(x)
    assert f == mapped and sgq.frame_info(f)["order"] == "identity" and codec.order is None
    assert np.array_equal(sgq.Codec().decode(f), y)
    with pytest.raises(ValueError, match="constant_blocks"):
        sgq.encode(x, mode="uniform", constant_blocks=True)


def test_constant_blocks_with_stochastic_rounding_stay_within_one_step(rng):
    x = zero_row_features(rng) + np.float32(0.1)  # constant rows of a value float16 cannot hold exactly
    frame = sgq.encode(x, bits=3, group=2, stripe_rows=1, ranges="frame", constant_blocks=True,
                       rounding="stochastic", seed=3)
    y = sgq.decode(frame)
    order = sgq.frame_info(frame)["order_list"] or list(range(6))
    xp, yp = x[:, order], y[:, order]  # groups are runs of the channel order
    for k in range(3):
        for row in range(8):
            blk = xp[:, 2 * k:2 * k + 2, row]
            lo, hi = f16_outward(blk.min(), blk.max())
            assert np.abs(yp[:, 2 * k:2 * k + 2, row] - blk).max() <= (hi - lo) / 7 * (1 + 1e-5) + 1e-6
    # each constant block (a sample's zero row of a group) decodes to one value
    for k in range(3):
        for row in range(3):
            blk = yp[:, 2 * k:2 * k + 2, row]
            assert np.all(blk == blk[:, :1, :1])


def test_version_1_frames_still_decode(rng):
    x = features(rng, n=2, c=6, h=4, w=4)
    v2 = sgq.encode(x)
    v1 = edit(v2, 4, "<H", 1)
    assert sgq.frame_info(v1)["version"] == 1
    assert np.array_equal(sgq.decode(v1), sgq.decode(v2))
    # flag bits 2 and 3 do not exist in version 1
    with pytest.raises(sgq.FrameError, match="flag"):
        sgq.decode(edit(sgq.encode(x, ranges="frame"), 4, "<H", 1))


def test_codec_baseline_modes(rng):
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for mode in ("uniform", "fp16"):
        c = sgq.Codec(mode=mode)
        assert sgq.frame_info(c.encode(x))["mode"] == mode


# ---------------------------------------------------------------------------------------------------
# frame_info and FrameError (hand-made bad frames)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def good(rng):
    return sgq.encode(features(rng, n=2, c=6, h=3, w=5), bits=3, group=2, stripe_rows=2)  # 540 code bits


def test_frame_info_reports_the_header(good):
    info = sgq.frame_info(good)
    assert info["version"] == 2 and info["mode"] == "sgq" and info["bits"] == 3
    assert info["order"] == "frame" and info["ranges"] == "sample" and len(info["order_list"]) == 6
    assert info["shape"] == (2, 6, 3, 5) and info["group"] == 2 and info["stripe_rows"] == 2
    assert info["rounding"] == "nearest" and info["dtype"] == "float32"
    assert info["crc32"] == zlib.crc32(good[:52] + good[56:])
    assert info["ranges_bytes"] == 4 * 2 * 3 * 2
    assert info["codes_bytes"] == (2 * 6 * 3 * 5 * 3 + 7) // 8


def test_frame_error_is_a_value_error():
    assert issubclass(sgq.FrameError, ValueError)
    assert edgelearn.sgq.FrameError is edgelearn._native.FrameError


BAD_FRAMES = {
    "empty": lambda g: b"",
    "short header": lambda g: g[:20],
    "truncated payload": lambda g: g[:-1],
    "trailing bytes": lambda g: g + b"\0",
    "bad magic": lambda g: edit(g, 0, "4s", b"JUNK"),
    "unknown version": lambda g: edit(g, 4, "<H", 3),
    "version zero": lambda g: edit(g, 4, "<H", 0),
    "permutation and stream order flags": lambda g: edit(g, 9, "B", 2 | 8),
    "frame ranges flag with per-sample ranges": lambda g: edit(g, 9, "B", 2 | 4),
    "unknown dtype": lambda g: edit(g, 6, "B", 7),
    "unknown mode": lambda g: edit(g, 7, "B", 3),
    "bits zero": lambda g: edit(g, 8, "B", 0),
    "bits nine": lambda g: edit(g, 8, "B", 9),
    "unknown flag": lambda g: edit(g, 9, "B", 0x40),
    "bad ndim": lambda g: edit(g, 10, "B", 7),
    "ndim 2 with spatial dims": lambda g: edit(g, 10, "B", 2),
    "reserved byte": lambda g: edit(g, 11, "B", 1),
    "zero dimension": lambda g: edit(g, 12, "<I", 0),
    "absurd shape": lambda g: edit(g, 16, "<I", 0xFFFFFFFF),
    "absurd shape product": lambda g: b"".join(
        [g[:12], struct.pack("<4I", 65536, 65536, 65536, 65536), g[28:]]
    ),
    "shape disagrees with lengths": lambda g: edit(g, 12, "<I", 3),
    "group zero": lambda g: edit(g, 28, "<I", 0),
    "group too large": lambda g: edit(g, 28, "<I", 99),
    "stripe rows too large": lambda g: edit(g, 32, "<I", 5),
    "permutation length": lambda g: edit(g, 36, "<I", 4),
    "ranges length": lambda g: edit(g, 40, "<I", 0xFFFFFFFF),
    "codes length": lambda g: edit(g, 44, "<Q", 1 << 62),
    "wrong crc": lambda g: edit(g, 52, "<I", 0, seal=False) if g[52:56] != b"\0" * 4 else edit(g, 52, "<I", 1, seal=False),
    "payload bit flip": lambda g: g[:-3] + bytes([g[-3] ^ 0x10]) + g[-2:],
    "random bytes": lambda g: bytes(np.random.default_rng(0).integers(0, 256, len(g), dtype=np.uint8)),
    "nan range": lambda g: edit(g, HEADER + 12, "<HH", 0x7E00, 0x7E00),
    "inverted range": lambda g: edit(g, HEADER + 12, "<HH", 0x3C00, 0x0000),
    "repeated channel in permutation": lambda g: edit(g, HEADER + 2, "<H", struct.unpack_from("<H", g, HEADER)[0]),
    "nonzero padding bits": lambda g: reseal(g[:-1] + bytes([g[-1] | 0x80])),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_decode_rejects_malformed_frame(good, name):
    assert sgq.frame_info(good)["permutation"]  # the permutation cases need one
    bad = BAD_FRAMES[name](good)
    with pytest.raises(sgq.FrameError):
        sgq.decode(bad)
    with pytest.raises(sgq.FrameError):
        sgq.frame_info(bad)


STREAM_BAD_FRAMES = {
    "truncated": lambda g: g[:-1],
    "wrong crc": lambda g: g[:-1] + bytes([g[-1] ^ 1]),
    "permutation length with stream order": lambda g: edit(g, 36, "<I", 12),
    "ranges length disagrees": lambda g: edit(g, 40, "<I", 4),
    "stream order in uniform mode": lambda g: edit(g, 7, "B", 1),
}


def _map_offset(frame):
    info = sgq.frame_info(frame)
    return HEADER + info["permutation_bytes"] + info["ranges_bytes"] - info["map_bytes"]


MAP_BAD_FRAMES = {
    "truncated": lambda g: g[:-1],
    "wrong crc": lambda g: g[:-1] + bytes([g[-1] ^ 1]),
    "one more constant block than the codes": lambda g: reseal(
        g[:_map_offset(g)] + bytes([g[_map_offset(g)] | 0xFF]) + g[_map_offset(g) + 1:]),
    "one fewer constant block than the codes": lambda g: reseal(
        g[:_map_offset(g)] + bytes([g[_map_offset(g)] & 0xFE]) + g[_map_offset(g) + 1:]),
    "codes length beyond the elements": lambda g: edit(g, 44, "<Q", 10**6),
    "codes length below one per block": lambda g: edit(g, 44, "<Q", 1),
    "map flag without a map": lambda g: edit(sgq.encode(zero_row_features(np.random.default_rng(1)), group=1,
                                                        stripe_rows=1, ranges="frame"), 9, "B", 4 | 16),
    "map in uniform mode": lambda g: edit(g, 7, "B", 1),
}


@pytest.mark.parametrize("name", sorted(MAP_BAD_FRAMES))
def test_decode_rejects_malformed_constant_block_maps(rng, name):
    good = sgq.encode(zero_row_features(rng), group=1, stripe_rows=1, ranges="frame", constant_blocks=True)
    assert sgq.frame_info(good)["constant_blocks"] > 0 and good[_map_offset(good)] & 1
    with pytest.raises(sgq.FrameError):
        sgq.decode(MAP_BAD_FRAMES[name](good))


@pytest.mark.parametrize("name", sorted(STREAM_BAD_FRAMES))
def test_decode_rejects_malformed_stream_order_frame_even_with_the_order(rng, name):
    x = features(rng, n=2, c=6, h=3, w=5)
    order = sgq.channel_order(x)
    good = sgq.encode(x, bits=3, group=2, stripe_rows=2, order=order, send_order=False)
    sgq.decode(good, order=order)
    bad = STREAM_BAD_FRAMES[name](good)
    with pytest.raises(sgq.FrameError):
        sgq.decode(bad, order=order)


def test_frame_error_messages_say_what_is_wrong(good):
    with pytest.raises(sgq.FrameError, match="magic"):
        sgq.decode(edit(good, 0, "4s", b"JUNK"))
    with pytest.raises(sgq.FrameError, match="CRC"):
        sgq.decode(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(sgq.FrameError, match="version"):
        sgq.decode(edit(good, 4, "<H", 9))


# ---------------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=0), ValueError, "bits"),
        (dict(bits=9), ValueError, "bits"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(group=0), ValueError, "group"),
        (dict(stripe_rows=0), ValueError, "stripe_rows"),
        (dict(rounding="up"), ValueError, "rounding"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(mode="int8"), ValueError, "mode"),
        (dict(mode="fp16", order=[0, 1, 2, 3]), ValueError, "order"),
        (dict(order=[0, 1, 1, 2]), ValueError, "order"),
        (dict(order=[0, 1]), ValueError, "order"),
        (dict(clip="prc"), ValueError, "clip"),
        (dict(clip=("sigma", 0.0)), ValueError, "clip"),
        (dict(clip=("minmax", 1.5)), ValueError, "clip"),
        (dict(clip=("sigma", "2")), TypeError, "clip"),
        (dict(mode="uniform", clip="sigma"), ValueError, "clip"),
    ],
)
def test_encode_argument_errors(rng, kwargs, exc, match):
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with pytest.raises(exc, match=match):
        sgq.encode(x, **kwargs)


def test_encode_rejects_bad_arrays():
    with pytest.raises(TypeError, match="x"):
        sgq.encode([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x"):
        sgq.encode(np.ones((2, 2, 2, 2), np.int32))
    with pytest.raises(ValueError, match="dimensions"):
        sgq.encode(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="dimensions"):
        sgq.encode(np.ones((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="no elements"):
        sgq.encode(np.ones((0, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        sgq.encode(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="binary16"):
        sgq.encode(np.array([[1.0, 1e6]], np.float32))
    with pytest.raises(TypeError, match="frame"):
        sgq.decode("not bytes")


def test_native_encode_checks_arguments_too(rng):
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="bits"):
        edgelearn._native._sgq_encode(x, "sgq", 0)
    with pytest.raises(ValueError, match="mode"):
        edgelearn._native._sgq_encode(x, "zip")
    with pytest.raises(ValueError, match="C-contiguous"):
        edgelearn._native._sgq_encode(x[:, :, ::2])


# ---------------------------------------------------------------------------------------------------
# range clipping
# ---------------------------------------------------------------------------------------------------


def test_parse_clip_forms_and_errors():
    assert sgq.parse_clip(None) is None and sgq.parse_clip("") is None and sgq.parse_clip("none") is None
    assert sgq.parse_clip("sigma:2.5") == ("sigma", 2.5)
    assert sgq.parse_clip("minmax") == ("minmax", 0.95)
    assert sgq.parse_clip(["sigma", 1]) == ("sigma", 1.0)  # as JSON carries it
    assert sgq.parse_clip(("minmax", 0.5)) == ("minmax", 0.5)
    for bad, exc in (("sigma:x", ValueError), ("sigma:-1", ValueError), ("minmax:0", ValueError),
                     ("sigma:nan", ValueError), ("trim:2", ValueError), (["sigma"], ValueError),
                     ({"sigma": 2}, ValueError), (["sigma", "2"], TypeError), (3, ValueError)):
        with pytest.raises(exc, match="clip"):
            sgq.parse_clip(bad)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_sigma_clip_law_on_one_block(rng, rounding):
    # one block (all channels, all rows) per sample: its range is [mean - z sd, mean + z sd] within [min, max],
    # rounded outwards to binary16; every value decodes within a step of itself clamped to that range
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    x[:, 0, 0, 0] = 40.0  # an outlier per sample
    z, bits = 1.5, 2
    y = sgq.decode(sgq.encode(x, bits=bits, group=4, stripe_rows=6, rounding=rounding, seed=1, clip=("sigma", z)))
    step_factor = 1.0 if rounding == "stochastic" else 0.5
    for n in range(3):
        v = x[n].astype(np.float64)
        lo = max(v.min(), v.mean() - z * v.std())
        hi = min(v.max(), v.mean() + z * v.std())
        lo16, hi16 = f16_outward(np.float32(lo), np.float32(hi))
        assert lo16 <= y[n].min() and y[n].max() <= hi16
        assert hi16 < 40.0  # the outlier was clipped
        step = (hi16 - lo16) / (2**bits - 1)
        err = np.abs(y[n] - np.clip(x[n], lo16, hi16))
        assert err.max() <= step_factor * step * (1 + 1e-5) + 1e-6


def test_clipping_cuts_the_bulk_error_of_post_relu_features_at_2_bits(rng):
    x = features(rng)
    x[:, :, :, 0] *= 10  # a large activation in every row
    bulk = np.ones(x.shape, bool)
    bulk[:, :, :, 0] = False

    def bulk_err(clip):
        y = sgq.decode(sgq.encode(x, bits=2, group=1, stripe_rows=1, ranges="frame", clip=clip))
        return np.linalg.norm((y - x)[bulk]) / np.linalg.norm(x[bulk])

    assert bulk_err("sigma:2.5") < 0.7 * bulk_err(None)
    assert bulk_err("minmax:0.5") < 0.85 * bulk_err(None)
    # a clip wider than every block changes nothing
    assert sgq.encode(x, bits=2, clip=("sigma", 1e6)) == sgq.encode(x, bits=2)
    assert sgq.encode(x, bits=2, clip=("minmax", 1.0)) == sgq.encode(x, bits=2)


def test_codec_passes_its_clip(rng):
    x = features(rng)
    codec = sgq.Codec(bits=2, clip="sigma:2", rounding="stochastic", seed=5)
    frame = codec.encode(x)
    assert frame == sgq.encode(x, bits=2, clip=("sigma", 2.0), rounding="stochastic", seed=5,
                               order=codec.order)
    assert frame != sgq.encode(x, bits=2, rounding="stochastic", seed=5, order=codec.order)
    assert "clip=('sigma', 2.0)" in repr(codec)
    with pytest.raises(ValueError, match="clip"):
        sgq.Codec(mode="fp16", clip="sigma")
