"""Where a run keeps its Ray results: a local folder, or a storage URI for clusters without a shared disk.

`--output-dir` of `cman train` / `tune` / `quickstart` is either:
- a plain path: one local folder holds everything (Ray's results and checkpoints and the local artefacts), as always;
- a storage URI (`s3://bucket/sweep`, `gs://...`, `file:///nfs/sweep`, anything `pyarrow.fs.FileSystem.from_uri`
  opens): Ray Train/Tune write their results and checkpoints there (`RunConfig(storage_path, storage_filesystem)`);
  the local artefacts (MLflow sqlite store, reports, `tune_results.csv`, exported checkpoints, sweep state) go to
  `--local-dir`, by default `./cman-runs/<bucket>/<path>` (the URI without its scheme and query).
Checkpoints are read back through the URI's filesystem (`ray.train.Checkpoint(path, filesystem)`), never as a local
path.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

LOCAL_ROOT = "cman-runs"  # default parent of --local-dir for a storage URI (relative to the working directory)


@dataclass(frozen=True)
class RunLocation:
    """`output`: what Ray's storage is called in messages (a resolved path or the URI as given); `fs` + `path`: that
    storage as a pyarrow filesystem and a path on it; `local_dir`: the local artefacts; `remote`: `output` is a URI."""

    output: str
    fs: pafs.FileSystem
    path: str
    local_dir: Path
    remote: bool

    def join(self, *parts: str) -> str:
        """Path on `fs` of `parts` below the storage root."""
        return posixpath.join(self.path, *parts)

    def ray_storage(self, *parts: str) -> dict[str, Any]:
        """`RunConfig` keyword arguments that put a Ray run under `parts`: a plain path exactly as before (no custom
        filesystem), a URI as its filesystem + path (query options such as `?region=` stay in the filesystem)."""
        if not self.remote:
            return {"storage_path": str(Path(self.path, *parts))}
        return {"storage_path": self.join(*parts), "storage_filesystem": self.fs}

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def describe(self, *parts: str) -> str:
        """`parts` below the storage root, for messages (the URI's scheme and bucket kept)."""
        if not self.remote:
            return str(Path(self.path, *parts))
        base = self.output.split("?", 1)[0].rstrip("/")
        return "/".join([base, *parts])


def locate(output: str | Path, local_dir: str | Path | None = None, flag: str = "--output-dir") -> RunLocation:
    """The `RunLocation` of `output` (a path or a storage URI); `local_dir` only applies to a URI (see the module)."""
    text = str(output)
    if "://" not in text:
        if local_dir is not None:
            raise ValueError(
                f"--local-dir is only used with a storage URI {flag} (a plain {flag} {text} holds everything); "
                f"to keep Ray's results apart, pass {flag} file://{Path(text).resolve()}"
            )
        path = Path(text).resolve()
        return RunLocation(str(path), pafs.LocalFileSystem(), str(path), path, remote=False)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, NotImplementedError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{flag} {text}: not a storage pyarrow can open ({first}); give a local folder or a URI such as "
            "s3://bucket/path, gs://bucket/path or file:///absolute/path"
        ) from None
    local = Path(local_dir) if local_dir is not None else default_local_dir(text)
    return RunLocation(text, fs, path.rstrip("/") or "/", local.resolve(), remote=True)


def default_local_dir(uri: str) -> Path:
    """`./cman-runs/<bucket>/<path>` for a storage URI (`s3://b/sweep?region=x` → `cman-runs/b/sweep`)."""
    parts = urlsplit(uri)
    names = [p for p in f"{parts.netloc}/{parts.path}".split("/") if p and p not in (".", "..")]
    return Path(LOCAL_ROOT, *names)


# ---- reading a run's files back ---------------------------------------------------------------------------------
def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def subdirs(fs: pafs.FileSystem, path: str, prefix: str = "") -> list[str]:
    """Paths of the folders directly in `path` whose names start with `prefix` (sorted); none if `path` is missing."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]
    return sorted(names)


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON file at `path`, or None if there is none."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def download(fs: pafs.FileSystem, source: str, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy the folder `source` on `fs` to the local folder `target` (replaced), leaving out files named in `skip`."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = pafs.LocalFileSystem()
    for info in fs.get_file_info(pafs.FileSelector(source, recursive=True)):
        if info.type != pafs.FileType.File or info.base_name in skip:
            continue
        destination = tmp / posixpath.relpath(info.path, source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(destination), source_filesystem=fs, destination_filesystem=local)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
