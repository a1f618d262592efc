"""The Hugging Face hub as xax reaches it: whether it can be reached now, said in one line.

``huggingface_hub`` retries a failed connection with a growing back-off (about 25 s before
``datasets.load_dataset`` gives up on a machine without network); one request with a short timeout
tells the same thing at once. The offline switches (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) are
read by ``huggingface_hub`` and ``datasets`` themselves.
"""

# The fixes a hub failure's message offers, shared by datasets and checkpoints.
OFFLINE_FIX = "set HF_HUB_OFFLINE=1 to read a copy already in the Hugging Face cache (HF_HOME)"


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, else https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable(timeout: float) -> str | None:
    """Why the hub cannot be reached now, or None when one request to it got an answer.

    Args:
        timeout: Seconds to wait for the answer.

    Returns:
        "HF_HUB_OFFLINE is set" in offline mode, else the failed request's reason; None when reachable
        (any HTTP answer counts: a repository's own errors are for the download to report).
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # any transport failure (refused, no DNS, timeout, proxy)
        return f"{constants.ENDPOINT} cannot be reached ({type(error).__name__}: {error})"
    return None
