"""The model registry: numbered, immutable model versions with their lineage, and a "promoted" pointer per model.

A registry is a location (local folder or `s3://bucket/prefix`, reached through `pipeline.storage`):

    <registry>/<model_name>/versions/<version>/      the model's files, copied from the checkpoint the caller names
    <registry>/<model_name>/versions/<version>/registration.json   lineage: when, from which data, config, metrics,
                                                                    parent model, source checkpoint (written last)
    <registry>/<model_name>/promoted.json            {version, promoted_at, reason}: the version to serve

Guarantees, and how they hold when a process is killed at any moment:

- A version is visible only once complete: `list_versions` shows a version only if its `registration.json` exists,
  and that file is written after every model file. Locally the version is built under `versions/.staging-<id>/`
  and published by one atomic `rename` to `versions/<n>/`; a kill leaves only an invisible staging folder.
- Version numbers are 1, 2, 3... and two writers never get the same one. Locally the `rename` fails when
  `versions/<n>/` already exists, and the loser takes the next number. On S3 the number is claimed first with a
  conditional PUT (`If-None-Match: *`, which AWS S3 and SeaweedFS honour) of `versions/<n>/.claim`; the files and
  then `registration.json` follow. A writer killed after its claim leaves a gap in the numbering, never a half
  version. A store that ignores `If-None-Match` would make this single-writer: run one registering job at a time.
- `promoted.json` is never half-written (`storage.write_atomically`): readers see the old pointer or the new one.

Versions are never modified or deleted here. This module imports neither Prefect nor torch.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import shutil
import uuid
from datetime import UTC, datetime
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.storage import (StorageConfig, absolute, filesystem, fsync_folder, is_remote, join, storage_errors,
                              write_atomically)

REGISTRATION_FILE = "registration.json"
PROMOTED_FILE = "promoted.json"
CLAIM_FILE = ".claim"
STAGING_PREFIX = ".staging-"
_MAX_NUMBER_ATTEMPTS = 100  # concurrent writers racing for a number; each lost race moves on by one
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COPY_CHUNK = 8 * 2**20


class ModelVersion(BaseModel):
    """One registered model version: where its files are and the lineage saved in its `registration.json`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    """Model name, e.g. `clip-tiny`."""

    version: int
    """Version number within the model: 1, 2, 3..."""

    location: str = Field(default="", exclude=True)
    """The version's folder (local path or `s3://...`): the model files and `registration.json`. Not saved."""

    created_at: datetime
    """When the version was registered (UTC)."""

    dataset: list[str]
    """Manifest location(s) of the data the model was trained on."""

    config: dict[str, Any]
    """The training run's config, as a plain dict."""

    metrics: dict[str, Any]
    """Evaluation metrics, e.g. `{"recall@1": 0.41}`."""

    parent: str | None
    """The model this one was trained from, as `name@version`, or None when trained from scratch."""

    source: str
    """The checkpoint location the files were copied from."""

    mixing_weight: float | None = None
    """WiSE-FT: the weights are (1 - w) x the parent's + w x the fine-tuned model's; None when not interpolated."""

    @property
    def ref(self) -> str:
        """`name@version`, the form a `parent` takes."""
        return f"{self.name}@{self.version}"


class Promotion(BaseModel):
    """The content of `promoted.json`: which version is promoted, when and why."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int
    """The promoted version number."""

    promoted_at: datetime
    """When it was promoted (UTC)."""

    reason: str
    """Why, in a sentence: e.g. `recall@1 0.41 > 0.38 of version 2`."""


# --- public API -----------------------------------------------------------------------------------------------------


def register_model(
    registry: str,
    name: str,
    checkpoint_location: str,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any],
    dataset: list[str] | str,
    parent: str | None,
    storage_config: StorageConfig | None = None,
    mixing_weight: float | None = None,
) -> ModelVersion:
    """Copy the files at `checkpoint_location` (a folder or one file) into the next version of `name`; return it.

    The version becomes visible to `list_versions` only once all its files and its `registration.json` are written.
    `parent` is `name@version` of the model this one was fine-tuned from, or None; `mixing_weight` the WiSE-FT weight
    between the parent and the fine-tuned model, when the files are an interpolation. Raises `UserError` for a bad
    name or parent, a missing checkpoint or a storage failure.
    """
    _check_name(name)
    if parent is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", parent):
        raise UserError(f"parent must look like name@version (e.g. clip-tiny@3), got {parent!r}")
    created = ModelVersion(
        name=name,
        version=0,  # the number is allocated while publishing
        created_at=datetime.now(UTC),
        # local paths are saved absolute: the lineage must still make sense when read from another folder
        dataset=[absolute(d) for d in ([dataset] if isinstance(dataset, str) else dataset)],
        config=config,
        metrics=metrics,
        parent=parent,
        source=absolute(checkpoint_location),
        mixing_weight=mixing_weight,
    )
    _registration_json(created)  # fail on a config or metric that is not JSON before copying anything
    files = _checkpoint_files(checkpoint_location, storage_config)
    versions = join(registry, name, "versions")
    with storage_errors(registry, storage_config):
        if is_remote(registry):
            number = _publish_remote(versions, files, created, storage_config)
        else:
            number = _publish_local(versions, files, created, storage_config)
    return created.model_copy(update={"version": number, "location": join(versions, str(number))})


def list_versions(registry: str, name: str, storage_config: StorageConfig | None = None) -> list[ModelVersion]:
    """Every complete version of `name`, oldest (1) first; [] when the model has none. Reads each registration."""
    _check_name(name)
    versions = join(registry, name, "versions")
    fs, path = filesystem(versions, storage_config)
    with storage_errors(registry, storage_config):
        numbers = _version_numbers(fs, path)
    found = []
    for number in numbers:
        try:
            found.append(_read_version(registry, name, number, storage_config))
        except FileNotFoundError:
            pass  # being written, or abandoned by a killed writer: not a version yet
    return found


def get_version(registry: str, name: str, version: int, storage_config: StorageConfig | None = None) -> ModelVersion:
    """Version `version` of `name`; `UserError` naming the versions that exist when it is not there (or incomplete)."""
    _check_name(name)
    try:
        return _read_version(registry, name, int(version), storage_config)
    except FileNotFoundError:
        existing = ", ".join(str(v.version) for v in list_versions(registry, name, storage_config)) or "none"
        raise UserError(f"model {name} has no version {version} in {registry} (versions: {existing})") from None


def promote(
    registry: str, name: str, version: int, reason: str, storage_config: StorageConfig | None = None
) -> None:
    """Point `name`'s `promoted.json` at `version` (which must be complete), atomically: old or new, never half."""
    get_version(registry, name, version, storage_config)  # refuse to promote a version that does not exist
    pointer = Promotion(version=int(version), promoted_at=datetime.now(UTC), reason=reason)
    data = pointer.model_dump_json(indent=2).encode()
    write_atomically(join(registry, name, PROMOTED_FILE), data, storage_config)


def promotion(registry: str, name: str, storage_config: StorageConfig | None = None) -> Promotion | None:
    """The content of `name`'s `promoted.json` (version, when, why), or None if no version was ever promoted."""
    _check_name(name)
    location = join(registry, name, PROMOTED_FILE)
    fs, path = filesystem(location, storage_config)
    with storage_errors(location, storage_config):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
    return Promotion.model_validate_json(data)


def promoted(registry: str, name: str, storage_config: StorageConfig | None = None) -> ModelVersion | None:
    """The promoted version of `name`, or None if none was ever promoted."""
    pointer = promotion(registry, name, storage_config)
    return None if pointer is None else get_version(registry, name, pointer.version, storage_config)


# --- reading --------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _MODEL_NAME.match(name or ""):
        raise UserError(f"model name must be letters, digits, '.', '_' or '-' (not starting with one), got {name!r}")


def _version_numbers(fs: fsspec.AbstractFileSystem, path: str) -> list[int]:
    """Numbers of every `versions/<n>` folder or prefix, complete or not, ascending."""
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(int(base) for base in (posixpath.basename(e.rstrip("/")) for e in entries) if base.isdigit())


def _read_version(registry: str, name: str, number: int, storage_config: StorageConfig | None) -> ModelVersion:
    location = join(registry, name, "versions", str(number))
    fs, path = filesystem(location, storage_config)
    with storage_errors(location, storage_config):
        try:
            data = fs.cat_file(posixpath.join(path, REGISTRATION_FILE))
        except FileNotFoundError:
            data = None  # raised below, outside storage_errors, which would turn it into a UserError
    if data is None:
        raise FileNotFoundError(f"{location} has no {REGISTRATION_FILE}: absent, or still being written")
    return ModelVersion.model_validate_json(data).model_copy(update={"location": location})


def _registration_json(version: ModelVersion) -> bytes:
    try:
        # checked as given: pydantic's JSON mode would quietly turn NaN into null and unknown objects into strings
        json.dumps({"config": version.config, "metrics": version.metrics}, allow_nan=False)
        return json.dumps(version.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise UserError(f"config and metrics of a registered model must be plain JSON values: {err}") from None


def _checkpoint_files(checkpoint_location: str, storage_config: StorageConfig | None) -> list[tuple[str, str]]:
    """(path in the checkpoint's filesystem, relative name in the version) for every file of the checkpoint."""
    fs, root = filesystem(checkpoint_location, storage_config)
    with storage_errors(checkpoint_location, storage_config):
        if fs.isfile(root):
            return [(root, posixpath.basename(root))]
        if not fs.isdir(root):
            raise UserError(f"checkpoint {checkpoint_location} does not exist")
        found = sorted(fs.find(root))
    files = [(p, posixpath.relpath(p, root)) for p in found]
    if not files:
        raise UserError(f"checkpoint {checkpoint_location} holds no files")
    reserved = {REGISTRATION_FILE, CLAIM_FILE}
    if any(relative in reserved for _, relative in files):
        raise UserError(f"checkpoint {checkpoint_location} contains a file named {REGISTRATION_FILE} or {CLAIM_FILE}")
    return files


# --- publishing -----------------------------------------------------------------------------------------------------


def _copy_files(
    files: list[tuple[str, str]], source: str, target: str, storage_config: StorageConfig | None, sync: bool
) -> None:
    """Stream each checkpoint file into the folder `target` (any filesystem to any filesystem).

    `sync` fsyncs each local file, so that the rename which publishes the version never exposes unwritten data.
    """
    source_fs, _ = filesystem(source, storage_config)
    target_fs, target_path = filesystem(target, storage_config)
    for source_path, relative in files:
        with storage_errors(source, storage_config):  # errors while writing are reported against the registry
            reader = source_fs.open(source_path, "rb")
        with reader, target_fs.open(posixpath.join(target_path, relative), "wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            if sync:
                writer.flush()
                os.fsync(writer.fileno())


def _publish_local(
    versions: str, files: list[tuple[str, str]], created: ModelVersion, storage_config: StorageConfig | None
) -> int:
    """Build the version in a staging folder, then rename it to the next free number; return that number."""
    _, versions_path = filesystem(versions, storage_config)
    os.makedirs(versions_path, exist_ok=True)
    staging = os.path.join(versions_path, f"{STAGING_PREFIX}{uuid.uuid4().hex}")
    os.mkdir(staging)
    try:
        _copy_files(files, created.source, staging, storage_config, sync=True)
        for _attempt in range(_MAX_NUMBER_ATTEMPTS):
            numbers = [int(entry) for entry in os.listdir(versions_path) if entry.isdigit()]
            number = max(numbers, default=0) + 1
            # registration.json holds the number, so it is (re)written for each try; it is the last file written
            with open(os.path.join(staging, REGISTRATION_FILE), "wb") as f:
                f.write(_registration_json(_numbered(created, number)))
                f.flush()
                os.fsync(f.fileno())
            fsync_folder(staging)
            try:
                os.rename(staging, os.path.join(versions_path, str(number)))  # fails if another writer took it
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            fsync_folder(versions_path)
            return number
        raise UserError(f"could not allocate a version number in {versions} after {_MAX_NUMBER_ATTEMPTS} tries")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a kill -9 skips this; the staging folder stays invisible
        raise


def _publish_remote(
    versions: str, files: list[tuple[str, str]], created: ModelVersion, storage_config: StorageConfig | None
) -> int:
    """Claim the next number with a conditional PUT, upload the files under it, write registration.json last."""
    fs, versions_path = filesystem(versions, storage_config)
    number = (_version_numbers(fs, versions_path) or [0])[-1] + 1
    for _attempt in range(_MAX_NUMBER_ATTEMPTS):
        claim = posixpath.join(versions_path, str(number), CLAIM_FILE)
        try:
            fs.pipe_file(claim, json.dumps({"claimed_at": datetime.now(UTC).isoformat()}).encode(), mode="create")
            break
        except OSError as err:
            if not _precondition_failed(err):
                raise
            number += 1  # another writer holds this number
    else:
        raise UserError(f"could not allocate a version number in {versions} after {_MAX_NUMBER_ATTEMPTS} tries")
    target = join(versions, str(number))
    _copy_files(files, created.source, target, storage_config, sync=False)
    registration = posixpath.join(versions_path, str(number), REGISTRATION_FILE)
    fs.pipe_file(registration, _registration_json(_numbered(created, number)))  # last: the version is now visible
    return number


def _precondition_failed(err: OSError) -> bool:
    """True when an S3 conditional PUT was refused because the object exists (s3fs reports it as EINVAL or EEXIST)."""
    if isinstance(err, FileExistsError):
        return True
    text = f"{err} {err.__cause__!r}"
    return "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text


def _numbered(created: ModelVersion, number: int) -> ModelVersion:
    return created.model_copy(update={"version": number})
