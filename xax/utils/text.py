"""Human-readable renderings of quantities for logs, reports and command-line output."""


def human_bytes(num_bytes: int | float, digits: int = 1) -> str:
    """``num_bytes`` in binary units: whole bytes below 1 KiB, else ``digits`` decimals.

    Args:
        num_bytes: A byte count (negative counts keep their sign).
        digits: Decimals shown for KiB and larger units.

    Returns:
        The count with its unit, from ``B`` up to ``PiB``.

    Examples:
        >>> [human_bytes(n) for n in (0, 1023, 1536, 3 * 1024**3)]
        ['0 B', '1023 B', '1.5 KiB', '3.0 GiB']
        >>> human_bytes(1.5 * 1024**2, digits=2)
        '1.50 MiB'
    """
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.{digits}f} {unit}"
