"""The tile table's Hopper entries fit sm_90 for every head dimension: shared memory within the opt-in
limit, a head tile that covers the head, and the backward kernel each width takes. No GPU needed."""
import numpy as np
import pytest

from cupyflash import _plan

HEADDIMS = range(1, _plan.HEADDIM_TILES[-1] + 1)


@pytest.mark.parametrize("dtype", _plan.TENSOR_CORE_DTYPES)
def test_hopper_blocks_fit_in_shared_memory(dtype):
    limit = _plan.SMEM_LIMITS[(9, 0)]
    every = sum(_plan.FEATURES.values()) - _plan.FEATURES["BIAS"]
    for headdim in HEADDIMS:
        for var in (_plan.variant(), _plan.variant(every, "bool")):
            for launch in (_plan.forward_sm90(dtype, headdim, var),
                           _plan.forward_sm90(dtype, headdim, var, _plan.SM90_WIDE_KEY_TILE_FROM),
                           *_plan.backward_sm90(dtype, headdim, var)):
                assert launch.smem_bytes <= limit, (headdim, launch.name, launch.smem_bytes)
                assert launch.threads <= 1024 and launch.options == _plan.SM90_OPTIONS


def test_hopper_backward_tiles_cover_the_head():
    for headdim in HEADDIMS:
        kernel, tile, keys, stages = _plan.sm90_backward_tiles(headdim)
        assert tile >= headdim and tile % 64 == 0  # whole TMA boxes of 64 columns
        assert kernel == ("flash_bwd_sm90" if headdim <= 128 else "flash_bwd_sm90_wide")
        assert keys % 64 == 0 and stages >= 2
    with pytest.raises(ValueError, match="headdim must be at most 256"):
        _plan.sm90_backward_tiles(257)


def test_hopper_backward_blocks_take_turns_only_on_short_key_blocks():
    """A block per multiprocessor (never more blocks than key blocks) where key blocks stream few query
    rows; a block per key block beyond."""
    rows = _plan.SM90_BWD_PERSISTENT_ROWS
    assert _plan.sm90_backward_blocks(4096, rows, 132) == 132
    assert _plan.sm90_backward_blocks(40, 64, 132) == 40
    assert _plan.sm90_backward_blocks(4096, rows + 64, 132) == 4096


def test_backward_l2_sections_fill_their_share_of_l2():
    l2 = 50 << 20
    share = int(l2 * _plan.L2_SHARE)
    for unit in (1 << 10, 1 << 19, share, share + 1, 1 << 30):
        for units in (1, 7, 512, 10 ** 6):
            section = _plan.l2_section(l2, unit, units)
            assert 1 <= section <= units
            assert section == units or section * unit <= share < (section + 1) * unit or section == 1


def test_hopper_kernels_take_16_bit_inputs_and_split_float32():
    for dtype in ("float64", "int8"):
        with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
            _plan.forward_sm90(dtype, 64, _plan.variant())
        with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
            _plan.backward_sm90(dtype, 64, _plan.variant())
    with pytest.raises(ValueError, match="forward takes float32 up to headdim 128"):
        _plan.forward_sm90("float32", 129, _plan.variant())
    with pytest.raises(ValueError, match="backward takes float32 up to headdim 128"):
        _plan.backward_sm90("float32", 129, _plan.variant())


def test_split_float32_blocks_fit_and_cover_the_head():
    limit = _plan.SMEM_LIMITS[(9, 0)]
    every = sum(_plan.FEATURES.values()) - _plan.FEATURES["BIAS"]
    for headdim in range(1, _plan.SM90_SPLIT_HEADDIM + 1):
        tile, rows, keys, stages = _plan.sm90_split_tiles(headdim)
        assert tile >= headdim and tile % 64 == 0 and keys % 16 == 0 and stages >= 1
        bwd_tile, bwd_keys, bwd_rows, bwd_stages = _plan.sm90_split_backward_tiles(headdim)
        assert bwd_tile >= headdim and bwd_tile % 64 == 0 and bwd_keys == 64 and bwd_rows % 16 == 0
        assert _plan.SM90_BWD_BLOCK_M % bwd_rows == 0 and bwd_stages >= 2  # whole tiles of the padded buffers
        for var in (_plan.variant(), _plan.variant(every, "bool")):
            launch = _plan.forward_sm90("float32", headdim, var)
            assert launch.smem_bytes <= limit and launch.block_rows == rows, (headdim, launch)
            prepare, main, convert = _plan.backward_sm90("float32", headdim, var)
            for launch in (prepare, main, convert, _plan.row_sums_sm90(headdim, var)):
                assert launch.smem_bytes <= limit, (headdim, launch.name, launch.smem_bytes)
            assert main.name.startswith("flash_bwd_sm90_split<") and main.block_rows == bwd_keys
            assert convert.name.endswith(", true>")  # dq converted from the split kernel's rows


def test_decode_slots_by_kernel():
    """The tensor-core decode plans a block per multiprocessor without asking the occupancy; the CUDA-core one
    every block that fits."""
    limit = _plan.smem_limit((9, 0))
    tensor_cores = _plan.decode("bfloat16", 128, 4, _plan.variant(), limit)
    cuda_cores = _plan.decode("float32", 128, 4, _plan.variant(), limit)

    def unasked():
        raise AssertionError("the tensor-core decode asked for its occupancy")

    assert _plan.decode_slots(tensor_cores, 132, unasked) == 132
    assert _plan.decode_slots(cuda_cores, 132, lambda: 9) == 132 * 9


def test_decode_splits_cover_the_band_in_whole_steps():
    """Splits are whole steps, cover the band, leave no split empty, honour a requested count and fill the
    device's slots when few blocks would leave most of them idle."""
    for band in (1, 63, 64, 65, 1000, 8192, 131072):
        for blocks in (1, 8, 64, 256, 1024):
            for requested in (0, 1, 3, 1000):
                splits, per_split = _plan.decode_splits(band, blocks, 264, 64, requested)
                assert per_split % 64 == 0 and splits >= 1
                assert (splits - 1) * per_split < band <= splits * per_split
                if requested:
                    assert splits <= requested
                elif blocks >= 0.8 * 264:
                    assert splits == 1
                elif band >= 64 * 264:
                    assert blocks * splits >= 0.9 * min(264, blocks * _plan.DECODE_MAX_SPLITS)


@pytest.mark.parametrize("dtype", _plan.WIDE_DTYPES)
def test_float32_and_float64_tiles_fit_every_shared_memory_table(dtype):
    """float32 and float64 take tensor-core tiles where they fit (float64 up to headdim 128) and the
    CUDA-core kernels elsewhere, within each GPU's shared memory; `tensor_cores=False` always takes CUDA cores,
    `tf32` names the tf32_t instantiations."""
    var = _plan.variant()
    for limit in set(_plan.SMEM_LIMITS.values()):
        for headdim in HEADDIMS:
            launches = (_plan.forward(dtype, headdim, var, True, limit), *_plan.backward(dtype, headdim, var, True, limit))
            for launch in launches:
                assert launch.smem_bytes <= limit, (headdim, launch.name, launch.smem_bytes)
            if dtype == "float64" and headdim > 128:
                assert all(launch.source in ("forward.cu", "backward.cu") for launch in launches)
            forced = (_plan.forward(dtype, headdim, var, True, limit, tensor_cores=False),
                      *_plan.backward(dtype, headdim, var, True, limit, tensor_cores=False))
            assert all(launch.source in ("forward.cu", "backward.cu") for launch in forced)
    big = _plan.SMEM_LIMITS[(9, 0)]
    fast = (_plan.forward(dtype, 64, var, True, big, tf32=True), *_plan.backward(dtype, 64, var, True, big, tf32=True)[1:])
    c_type = "tf32_t" if dtype == "float32" else "double"
    assert all(launch.source.endswith("_mma.cu") and launch.name.split("<")[1].startswith(c_type + ",")
               for launch in fast)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (7, 300), (300, 7), (97, 130), (200, 200), (64, 1)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 3), (0, 0), (5, -1), (0, 400), (150, 150)])
def test_keys_seen_is_the_mean_count_of_each_row(seqlen_q, seqlen_k, window):
    """keys_seen: the mean over all rows of the keys inside the row's window, rows aligned bottom-right."""
    left, right = window
    keys = np.arange(seqlen_k)
    counts = []
    for row in range(seqlen_q):
        diagonal = row + seqlen_k - seqlen_q
        inside = np.ones(seqlen_k, bool)
        if left >= 0:
            inside &= keys >= diagonal - left
        if right >= 0:
            inside &= keys <= diagonal + right
        counts.append(np.count_nonzero(inside))
    assert _plan.keys_seen(seqlen_q, seqlen_k, window) == pytest.approx(np.mean(counts), abs=1e-9)


def test_wide_key_tiles_follow_the_keys_a_row_sees():
    """Causal rows at 2k see 1k keys on average: 128-key tiles; at 4k, 2k keys: 192; a window of 256: 128."""
    wide = _plan.SM90_WIDE_KEY_TILE_FROM
    var = _plan.variant(_plan.FEATURES["WINDOW"])
    for seqlen, window, block_n in [(wide, (-1, -1), 192), (wide, (-1, 0), 128), (2 * wide, (-1, 0), 192),
                                    (8 * wide, (256, 0), 128)]:
        keys = _plan.keys_seen(seqlen, seqlen, window)
        assert _plan.sm90_tiles(64, keys, var)[2] == block_n, (seqlen, window)


def test_bounded_scores_take_a_deeper_ring_only_where_measured_faster():
    """Three K/V stages for a bfloat16 softcap alone on rows of SM90_BOUNDED_STAGES_FROM keys or more at head
    tile 128, with one query buffer; two elsewhere."""
    def stages(launch):
        return [int(x) for x in launch.name.split("<")[1].split(", ")[3:5]]

    softcap, long = _plan.variant(_plan.FEATURES["SOFTCAP"]), _plan.SM90_BOUNDED_STAGES_FROM
    deep = _plan.forward_sm90("bfloat16", 128, softcap, long, softcap=50.0)
    assert stages(deep) == [_plan.SM90_BOUNDED_STAGES, 1]
    assert deep.smem_bytes <= _plan.SMEM_LIMITS[(9, 0)]
    causal = _plan.variant(_plan.FEATURES["SOFTCAP"] | _plan.FEATURES["WINDOW"])
    dropout = _plan.variant(_plan.FEATURES["SOFTCAP"] | _plan.FEATURES["DROPOUT"])
    others = (("bfloat16", 128, softcap, long - 1, 50.0),  # short rows
              ("float16", 128, softcap, long, 50.0),  # float16 keeps a running max
              ("bfloat16", 128, softcap, long, 100.0),  # a cap past the bound
              ("bfloat16", 128, causal, long, 50.0), ("bfloat16", 128, dropout, long, 50.0),
              ("bfloat16", 64, softcap, long, 50.0), ("bfloat16", 256, softcap, long, 50.0))
    for dtype, head, var, keys, cap in others:
        launch = _plan.forward_sm90(dtype, head, var, keys, softcap=cap)
        assert stages(launch)[0] == _plan.SM90_STAGES, launch.name


def test_decode_rows_in_slabs():
    """A kv head's query rows take one decode block per slab (the last partly filled): on tensor cores two mma
    tiles of 16 rows where one does not hold them, up to head tile 128; on CUDA cores 16 rows, the kernel
    compiled for the fewest rows that hold a slab."""
    assert [_plan.decode_slabs("bfloat16", 128, rows) for rows in (1, 16, 17, 32, 40, 512)] == [1, 1, 1, 1, 2, 16]
    assert [_plan.decode_slabs("float16", 256, rows) for rows in (1, 16, 17, 40)] == [1, 1, 2, 3]
    assert [_plan.decode_slabs("float32", 128, rows) for rows in (1, 16, 17, 40)] == [1, 1, 2, 3]
    for rows, tiles in ((1, 1), (16, 1), (17, 2), (200, 2)):
        assert f", {tiles}, V>" in _plan.decode("bfloat16", 128, rows, "V", 227 * 1024).name
    assert ", 1, V>" in _plan.decode("bfloat16", 256, 40, "V", 227 * 1024).name
    for rows, slab in ((1, 1), (3, 4), (16, 16), (17, 16), (128, 16)):
        assert f"float, 128, {slab}, " in _plan.decode("float32", 128, rows, "V", 48 * 1024).name


def test_the_dense_forward_serves_full_query_tiles_that_fill_the_device():
    """A 16-bit KV-cache call within the decode kernels' rows goes to the dense forward where seqlen_q fills its
    query tiles and the tiles give every multiprocessor one; float32 stays with the decode kernels."""
    assert _plan.dense_serves("bfloat16", 128, 16 * 32, 132)
    assert _plan.dense_serves("float16", 256, 66, 132)  # two tiles per query head
    assert not _plan.dense_serves("bfloat16", 127, 16 * 32, 132)  # a part-filled tile
    assert not _plan.dense_serves("bfloat16", 256, 32, 132)  # 64 tiles: half the device
    assert not _plan.dense_serves("float32", 128, 16 * 32, 132)
