"""Tests for reading and writing IDX files."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from xax.core.errors import DataError
from xax.utils.idx import read_idx, write_idx


def test_reads_a_hand_built_file(tmp_path: Path) -> None:
    values = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 7
    # Magic number: two zero bytes, type code 0x0B (int16), 3 dimensions; then big-endian sizes.
    data = bytes([0, 0, 0x0B, 3]) + struct.pack(">3I", 2, 3, 4) + values.astype(">i2").tobytes()
    (tmp_path / "raw.idx").write_bytes(data)
    (tmp_path / "packed.idx.gz").write_bytes(gzip.compress(data))
    for name in ("raw.idx", "packed.idx.gz"):
        array = read_idx(tmp_path / name, md5=hashlib.md5(data).hexdigest())
        assert array.dtype == np.int16
        assert array.dtype.isnative
        np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_write_read_round_trip(tmp_path: Path, dtype: type, compress: bool) -> None:
    values = (np.arange(30).reshape(5, 6) * 3 - 40).astype(dtype)
    write_idx(tmp_path / "values.idx", values, compress=compress)
    array = read_idx(tmp_path / "values.idx")
    assert array.dtype == values.dtype
    assert array.shape == (5, 6)
    np.testing.assert_array_equal(array, values)


def test_md5_mismatch_names_the_file_and_both_digests(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx.gz"
    write_idx(path, np.arange(10, dtype=np.uint8), compress=True)
    actual = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
    expected = "0" * 32
    with pytest.raises(DataError, match=rf"labels\.idx\.gz has MD5 {actual} .* expected {expected}"):
        read_idx(path, md5=expected)


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(DataError, match=r"short\.idx holds 2 bytes of values .* needs 5"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x0A, 1]) + struct.pack(">I", 1) + b"\x01")
    with pytest.raises(DataError, match="type code 0x0A"):
        read_idx(path)
    with pytest.raises(DataError, match="cannot store dtype int64"):
        write_idx(path, np.zeros(3, dtype=np.int64))
