"""Checkpoints in object stores: what orbax needs to write and read them atomically there.

Orbax reaches ``gs://`` natively. For ``s3://`` its metadata goes through ``etils.epath`` (fsspec's
``s3fs``), but it builds the TensorStore store of the arrays for Google Cloud Storage or a local
folder only; ``use_s3_arrays`` gives it TensorStore's own S3 driver for ``s3://`` paths. On an object
store a folder cannot be renamed in one step, so a checkpoint is written in place and marked
complete by a last file (``commit_success.txt``, orbax's way on Google Cloud Storage).
"""

import functools
from typing import Any

from etils import epath
from orbax.checkpoint import path as ocp_path

from xax.utils.env import aws_keys_in_environment, aws_region, s3_endpoint
from xax.utils.storage import is_remote

COMMIT_FILE = "commit_success.txt"


def temporary_path_class(directory: epath.Path) -> Any:
    """How orbax makes a write atomic in ``directory``: a completion file in an object store (where
    a rename copies every object), else its default (a temporary folder renamed into place)."""
    return ocp_path.atomicity.CommitFileTemporaryPath if is_remote(directory) else None


def is_committed(step_dir: epath.Path) -> bool:
    """Whether a checkpoint in an object store was completed (its commit file written last)."""
    return (step_dir / COMMIT_FILE).exists()


def _s3_spec(spec: Any) -> Any:
    """A TensorStore spec built for Google Cloud Storage, pointed at the same bucket and key in S3."""
    if isinstance(spec, list):
        return [_s3_spec(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    converted = {key: _s3_spec(value) for key, value in spec.items()}
    if converted.get("driver") in ("gcs", "gcs_grpc") and "bucket" in converted:
        converted["driver"] = "s3"
        endpoint, region = s3_endpoint(), aws_region()
        if endpoint is not None:
            converted["endpoint"] = endpoint
        if region is not None or endpoint is not None:
            converted["aws_region"] = region or "us-east-1"  # signing needs one; S3-compatible servers ignore it
        if aws_keys_in_environment():
            # Taken from there directly: TensorStore's default chain first reads ~/.aws and reports
            # each missing file on stderr.
            converted["aws_credentials"] = {"type": "environment"}
    return converted


def prepare_orbax(directory: epath.PathLike) -> None:
    """Readies orbax for a checkpoint at ``directory``: for an ``s3://`` URL, its arrays' S3 store."""
    if str(directory).startswith("s3://"):
        use_s3_arrays()


@functools.cache
def use_s3_arrays() -> None:
    """Makes orbax write and read the arrays of an ``s3://`` checkpoint through TensorStore's S3
    driver (once per process; paths of other schemes are untouched).

    The endpoint and region come from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` (as for the AWS tools), the credentials from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when set, else TensorStore's usual AWS sources
    (profile, instance role).
    """
    from orbax.checkpoint._src.serialization import tensorstore_utils

    build = tensorstore_utils.build_kvstore_tspec

    @functools.wraps(build)
    def build_kvstore_tspec(directory: Any, name: str | None = None, **kwargs: Any) -> Any:
        text = str(directory)
        if text.startswith("s3://"):
            # Orbax knows an object store's layout only as gs://bucket/key; the spec is then
            # pointed at the same bucket and key in S3.
            return _s3_spec(build("gs://" + text.removeprefix("s3://"), name, **kwargs))
        return build(directory, name, **kwargs)

    setattr(tensorstore_utils, "build_kvstore_tspec", build_kvstore_tspec)  # noqa: B010
