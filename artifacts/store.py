"""Model stores by URI: a local directory (a plain path or `file:///abs/path`) or an object store (`s3://bucket/prefix`).

The layout is the same everywhere: `STORE/<name>/<version>/` holding the artifact's files (artifacts/artifact.py),
and a version exists once its `manifest.json` does. A local store is read and written in place. An object store is
reached through `pyarrow.fs` (credentials and endpoint from the usual AWS variables: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, and AWS_ENDPOINT_URL for an S3-compatible server such as MinIO):

- reading: an artifact is downloaded once per machine into the cache (`$GENSERVE_CACHE`, default
  `~/.cache/genserve`), under `downloads/` and the store's bucket and path, and loaded from there; versions never
  change once written, and `load_artifact` checks every file's sha256 against the manifest on each load anyway;
- writing: training writes to a local mirror in the cache (`mirrors/`; its checkpoints stay there too), and each new
  version is uploaded after it is complete, the manifest last, so a reader never sees half an artifact.
  Two trainers racing to upload the same model name to one object store can collide on a version number (object
  stores have no atomic rename): the loser's upload fails its read-back check and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from genserve.artifacts import artifact as art

REMOTE_SCHEMES = ("s3",)


def cache_root() -> Path:
    return Path(os.environ.get("GENSERVE_CACHE") or Path.home() / ".cache" / "genserve")


def store_uri(store: str | os.PathLike | None = None) -> str:
    """The store's URI as given: the argument, else $GENSERVE_STORE, else ./model-store."""
    return str(store or os.environ.get("GENSERVE_STORE") or art.DEFAULT_STORE)


def scheme(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:\\..." is a path, not a URI


def is_remote(uri: str | os.PathLike) -> bool:
    return scheme(str(uri)) in REMOTE_SCHEMES


def local_path(uri: str | os.PathLike) -> Path:
    """The directory of a local store URI: a path, or file:///abs/path."""
    uri = str(uri)
    kind = scheme(uri)
    if kind == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):  # file://model-store would silently mean "/"
            raise ValueError(f"store {uri!r}: a file URI names an absolute path, file:///path/to/store")
        return Path(parsed.path)
    if kind:
        raise ValueError(f"store {uri!r}: unsupported scheme {kind!r}; use a path, file:///path or "
                         f"{', '.join(s + '://bucket/prefix' for s in REMOTE_SCHEMES)}")
    return Path(uri)


class LocalStore:
    """A store on this machine's filesystem (or a volume every node mounts at the same path)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = local_path(uri)

    def __repr__(self) -> str:
        return str(self.root)

    def list_models(self) -> dict[str, list[str]]:
        return art.list_models(self.root)

    def versions(self, name: str) -> list[str]:
        return art.versions(self.root, name)

    def location(self, name: str, version: str = "latest") -> str:
        """Where the artifact lives, as `load_artifact` takes it."""
        return str(art.resolve(self.root, name, version).resolve())

    def subpath(self, *parts: str) -> str:
        """A path (or URI) inside the store, e.g. for Ray Train's checkpoints."""
        return str(self.root.resolve().joinpath(*parts))

    def begin_writing(self) -> Path:
        """The local directory training writes new versions into: the store itself."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def finish_writing(self) -> list[str]:
        """Publish what was written since `begin_writing`: here it already is; returns the uploaded URIs."""
        return []

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        yield self.begin_writing()
        self.finish_writing()


class RemoteStore:
    """A store in an object store, through pyarrow.fs."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a malformed URI or missing settings
            raise ValueError(f"store {uri!r}: cannot be opened ({e})") from None
        self.root = self.root.rstrip("/")
        parsed = urlparse(self.uri)
        where = Path(parsed.scheme, parsed.netloc, parsed.path.strip("/"))
        self.cache = cache_root() / "downloads" / where  # copies of the store's versions, by the store's numbers
        self.mirror = cache_root() / "mirrors" / where  # what training here wrote, by this machine's numbers
        self._before: dict[str, set[str]] = {}  # the mirror's versions when writing began

    def __repr__(self) -> str:
        return self.uri

    def _dirs(self, path: str) -> list[str]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise art.ArtifactError(f"store {self.uri}: cannot be listed ({e})") from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def versions(self, name: str) -> list[str]:
        import pyarrow.fs as pafs

        found = []
        for version in self._dirs(f"{self.root}/{name}"):
            manifest = self.fs.get_file_info(f"{self.root}/{name}/{version}/{art.MANIFEST}")
            if version.isdigit() and manifest.type == pafs.FileType.File:
                found.append(version)
        return sorted(found, key=int)

    def list_models(self) -> dict[str, list[str]]:
        import pyarrow.fs as pafs

        bucket = self.root.split("/", 1)[0]
        try:
            missing = self.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            raise art.ArtifactError(f"store {self.uri}: cannot be reached ({e})") from None
        if missing:  # an empty prefix is an empty store, but a missing bucket is a mistake
            raise art.ArtifactError(f"store {self.uri}: bucket {bucket!r} does not exist")
        models = {name: self.versions(name) for name in self._dirs(self.root) if not name.startswith(".")}
        return {name: v for name, v in models.items() if v}

    def location(self, name: str, version: str = "latest") -> str:
        available = self.versions(name)
        if not available:
            raise art.ArtifactError(f"no model named {name!r} in the store {self.uri}")
        if version == "latest":
            version = available[-1]
        elif version not in available:
            raise art.ArtifactError(f"model {name!r} has no version {version!r}; available: {', '.join(available)}")
        return f"{self.uri}/{name}/{version}"

    def subpath(self, *parts: str) -> str:
        return "/".join((self.uri, *parts))

    def download(self, name: str, version: str) -> Path:
        """The artifact's directory in the local cache, downloaded first if it is not there yet."""
        target = self.cache / name / version
        if (target / art.MANIFEST).is_file():
            return target
        source = f"{self.root}/{name}/{version}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-downloading-", dir=target.parent))
        try:
            import pyarrow.fs as pafs

            for info in self.fs.get_file_info(pafs.FileSelector(source)):
                if info.type != pafs.FileType.File:
                    continue
                with self.fs.open_input_stream(info.path) as stream:
                    (tmp / info.base_name).write_bytes(stream.read())
            if not (tmp / art.MANIFEST).is_file():
                raise art.ArtifactError(f"{self.uri}/{name}/{version}: has no {art.MANIFEST}; not an artifact")
            try:
                tmp.rename(target)
            except OSError:  # another process on this machine downloaded it first
                if not (target / art.MANIFEST).is_file():
                    raise
        except OSError as e:
            raise art.ArtifactError(f"{self.uri}/{name}/{version}: cannot be downloaded ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def upload(self, directory: Path, name: str) -> str:
        """Copy a complete local artifact directory in as the next version of `name`; returns its URI."""
        version = str(max((int(v) for v in self._dirs(f"{self.root}/{name}") if v.isdigit()), default=0) + 1)
        destination = f"{self.root}/{name}/{version}"
        manifest = (directory / art.MANIFEST).read_bytes()
        # The version number is the store's, which may differ from the mirror's: the manifest says which it is.
        raw = json.loads(manifest)
        raw["version"] = version
        manifest = (json.dumps(raw, indent=2) + "\n").encode()
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != art.MANIFEST)
        for path in files:
            with self.fs.open_output_stream(f"{destination}/{path.name}") as stream:
                stream.write(path.read_bytes())
        with self.fs.open_output_stream(f"{destination}/{art.MANIFEST}") as stream:
            stream.write(manifest)
        with self.fs.open_input_stream(f"{destination}/{art.MANIFEST}") as stream:
            if hashlib.sha256(stream.read()).digest() != hashlib.sha256(manifest).digest():
                raise art.ArtifactError(f"{self.uri}/{name}/{version}: another writer uploaded this version at the "
                                        "same time; train again")
        return f"{self.uri}/{name}/{version}"

    def begin_writing(self) -> Path:
        """A local mirror to train into; `finish_writing` uploads the versions completed in it since."""
        self.mirror.mkdir(parents=True, exist_ok=True)
        self._before = {n: set(v) for n, v in art.list_models(self.mirror).items()}
        return self.mirror

    def finish_writing(self) -> list[str]:
        uploaded = []
        for name, versions in art.list_models(self.mirror).items():
            for version in versions:
                if version not in self._before.get(name, set()):
                    uploaded.append(self.upload(self.mirror / name / version, name))
        self._before = {}
        return uploaded

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        yield self.begin_writing()
        self.finish_writing()


Store = LocalStore | RemoteStore


def open_store(store: str | os.PathLike | None = None) -> Store:
    """The store at `store` (a path or URI), else $GENSERVE_STORE, else ./model-store."""
    uri = store_uri(store)
    return RemoteStore(uri) if is_remote(uri) else LocalStore(uri)


def fetch_artifact(location: str | os.PathLike) -> Path:
    """A local directory holding the artifact at `location`: a path, a file:// URI or an object-store URI of a
    version directory (`s3://bucket/prefix/NAME/VERSION`), downloaded into the cache first."""
    location = str(location)
    if not is_remote(location):
        return local_path(location)
    uri = location.rstrip("/")
    head, name, version = uri.rsplit("/", 2)
    return RemoteStore(head).download(name, version)


def load_artifact_at(location: str | os.PathLike) -> art.Artifact:
    """The verified artifact at `location` (a path, file:// or s3:// URI), fetched into the local cache if remote."""
    return art.load_artifact(fetch_artifact(location))
