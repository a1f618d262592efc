"""Reading and writing IDX files, the format MNIST is distributed in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order, big-endian. Files are often gzipped.
"""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from xax.core.errors import DataError

# Type code in the magic number -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses the decompressed bytes of an IDX file.

    Args:
        data: The whole file, decompressed.
        name: What to call the data in error messages (usually the file path).

    Returns:
        The array, in native byte order, with the shape and dtype from the header.

    Raises:
        DataError: If the header is not an IDX header or the payload has the wrong size.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name} is not an IDX file: it must start with two zero bytes, found {data[:4]!r}")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise DataError(f"{name} has IDX type code 0x{type_code:02X}; known codes are {known}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{name} is truncated: its header declares {ndim} dimensions but the file ends early")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise DataError(
            f"{name} holds {len(data) - header_size} bytes of values but its header {tuple(shape)} of "
            f"{dtype.name} needs {expected}; the file is truncated or corrupt, download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    # A copy in native order: writable, and fast for every later operation.
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, *, md5: str | None = None) -> np.ndarray:
    """Reads an IDX file, gzipped or not (detected from its first bytes).

    Args:
        path: The file to read.
        md5: The expected MD5 hex digest of the decompressed bytes; None skips the check.

    Returns:
        The array, in native byte order, with the shape and dtype from the header.

    Raises:
        DataError: If the digest does not match or the file is not a valid IDX file.
    """
    path = Path(path)
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    if md5 is not None:
        actual = hashlib.md5(data).hexdigest()
        if actual != md5.lower():
            raise DataError(
                f"{path} has MD5 {actual} (of its decompressed bytes), expected {md5}; "
                "the file is corrupt or a different version: replace it with the original"
            )
    return parse_idx(data, str(path))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Writes an array as an IDX file.

    Args:
        path: Where to write.
        array: The values; their dtype must be one IDX supports (uint8, int8, int16, int32, float32,
            float64).
        compress: Gzip the file.

    Raises:
        DataError: If IDX cannot store the array's dtype.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "digits.idx.gz"
        >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3), compress=True)
        >>> read_idx(path).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    native = np.dtype(array.dtype).newbyteorder("=")
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    if native not in codes:
        names = ", ".join(dtype.name for dtype in IDX_DTYPES.values())
        raise DataError(f"IDX cannot store dtype {array.dtype}; convert the array to one of {names}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)
