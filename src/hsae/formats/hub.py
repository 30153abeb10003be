"""The Hugging Face hub: `hf://owner/repo[/sub/folder][@revision]` names, resolved to a local folder
through huggingface_hub's own cache, and `push`.

Resolution is `snapshot_download` restricted to the named sub-folder, so the client's rules hold:
files already in the cache (HF_HUB_CACHE) are used as they are, a revision (branch, tag or commit)
pins what is read, and with HF_HUB_OFFLINE=1 nothing is fetched: a name that is not cached is a
clear error. The commit read is recorded by importers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hsae.errors import HsaeError

HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{sub}{rev}"


@dataclass(frozen=True)
class Resolved:
    path: Path  # the local folder or file
    ref: HubRef | None = None  # None for a local path
    commit: str | None = None  # the hub commit whose files were read


def is_hub_name(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_name(spec: str) -> HubRef:
    """hf://owner/repo/sub/folder@revision -> HubRef (the revision may itself hold slashes)."""
    body = spec[len(HUB_PREFIX) :]
    body, _, revision = body.partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise HsaeError(f"{spec!r} is not a hub name; write hf://owner/repo[/sub/folder][@revision]")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def _patterns(subfolder: str | None) -> list[str] | None:
    if subfolder is None:
        return None
    sub = PurePosixPath(subfolder)
    patterns = [str(sub), f"{sub}/*"]
    if sub.suffix:  # a weights file: its folder's configs too (dictionary_learning checkpoints/ae_N.pt)
        patterns += [_json_in(sub.parent), _json_in(sub.parent.parent)]
    return patterns


def _json_in(folder: PurePosixPath) -> str:
    return "*.json" if str(folder) == "." else f"{folder}/*.json"


def resolve(spec: str | Path, cache_dir: str | Path | None = None) -> Resolved:
    """A local path for `spec`: a local path as it is, a hub name through the hub cache."""
    if not is_hub_name(spec):
        return Resolved(Path(spec).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = parse_hub_name(str(spec))
    try:
        root = Path(
            snapshot_download(
                ref.repo_id, revision=ref.revision, allow_patterns=_patterns(ref.subfolder), cache_dir=cache_dir
            )
        )
    except LocalEntryNotFoundError:
        raise HsaeError(
            f"{ref} is not in the local hub cache and the hub cannot be reached (offline: HF_HUB_OFFLINE=1 or no "
            "network); fetch it once with network access, or set HF_HUB_CACHE to a cache that holds it"
        ) from None
    except RevisionNotFoundError:
        raise HsaeError(f"{ref}: the hub repo {ref.repo_id} has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise HsaeError(f"{ref}: no hub repo {ref.repo_id} (or it is private: log in with `hf auth login`)") from None
    except HFValidationError as err:
        raise HsaeError(f"{ref}: {err}") from None
    path = root / ref.subfolder if ref.subfolder else root
    if not path.exists():
        raise HsaeError(f"{ref}: the repo (commit {root.name}) has no {ref.subfolder!r}")
    return Resolved(path, ref, root.name)


def push(folder: Path, repo_id: str, *, path_in_repo: str | None, revision: str | None, private: bool) -> str:
    """Upload `folder` to the hub repo (created if missing); returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        revision=revision,
        commit_message=f"hsae push {folder.name}",
    )
    return str(getattr(info, "commit_url", info))
