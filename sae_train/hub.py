"""Push exports to the Hugging Face hub, pull them back, and load them as sae_train SAEs.

    push("runs/export", "org/sae-smollm2", private=True)       # token: HF_TOKEN or `hf auth login`
    sae = load_exported("org/sae-smollm2", folder="blocks.8.hook_resid_post")
    sae = load_exported("runs/export/blocks.8.hook_resid_post")  # a local folder works the same

An export (sae_train/export.py) is a folder per SAE in the SAELens v6 layout (cfg.json,
sae_weights.safetensors, optional sparsity.safetensors) plus a README.md model card; SAELens
loads the same folders with `SAE.from_pretrained(repo_id, folder)`. The token is handed to
huggingface_hub and nothing else: it is never printed, logged or put in a message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_train.errors import UserError
from sae_train.sae import SAE
from sae_train.sae.saelens import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, from_saelens

log = logging.getLogger(__name__)

TOKEN_HELP = (
    "Set the HF_TOKEN environment variable to a write token (huggingface.co/settings/tokens), "
    "or log in once with `hf auth login` (`huggingface-cli login` in older huggingface_hub)."
)


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else huggingface_hub's stored login; a UserError when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError(f"Pushing to the Hugging Face hub needs an access token, and none is available. {TOKEN_HELP}")
    return found


def check_repo_id(repo_id: str) -> None:
    """A UserError unless repo_id is a valid `owner/name` model repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise UserError(
            f"repo_id={repo_id!r} is not a hub repository id; expected 'owner/name' (a user or organisation, "
            "then letters, digits, '-', '_' or '.'), e.g. repo_id=my-org/sae-smollm2-135m."
        )


def _hub_error(action: str, repo_id: str, exc: BaseException) -> UserError:
    # str(exc) holds the server's message and request id, never the request headers (the token).
    return UserError(f"Could not {action} hub repository {repo_id}: {type(exc).__name__}: {exc}")


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, OSError]
    try:  # the HTTP client's transport errors (httpx in huggingface_hub >= 1, httpx2 in 2.x)
        from huggingface_hub.utils import _http

        client_module = next((getattr(_http, name) for name in ("httpx2", "httpx") if hasattr(_http, name)), None)
        if client_module is not None:
            errors.append(client_module.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _files_below(folder: Path) -> list[str]:
    """Every regular file below folder (posix paths relative to it), skipping hidden names."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    paths: Sequence[str] | None = None,
    commit_message: str = "Upload SAEs exported by sae-train",
) -> str:
    """Upload `paths` (posix, relative to folder; default: every non-hidden file below it) to the
    model repository `repo_id` in one commit, creating the repository when needed (`private`
    applies only then). Files already in the repository and not in `paths` stay. Returns the
    commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"Nothing to push: {root} is not a directory. Run sae-train export first.")
    check_repo_id(repo_id)
    token = resolve_token(token)
    files = list(paths) if paths is not None else _files_below(root)
    if not files:
        raise UserError(f"Nothing to push: {root} holds no files.")
    missing = [p for p in files if not (root / p).is_file()]
    if missing:
        raise ValueError(f"push: {missing} are not files below {root}")
    api = HfApi(token=token)
    errors = _network_errors()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except errors as exc:
        raise _hub_error("create", repo_id, exc) from None
    log.info("uploading %d files to %s", len(files), url)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in files]
    try:
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    except errors as exc:
        raise _hub_error("upload to", repo_id, exc) from None
    return str(commit.commit_url)


def _is_export_folder(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def find_exports(root: str | os.PathLike) -> list[str]:
    """The SAE folders of an export (posix paths relative to root; "." when root is one)."""
    base = Path(root)
    if _is_export_folder(base):
        return ["."]
    return sorted(
        path.parent.relative_to(base).as_posix()
        for path in base.rglob(CFG_FILE)
        if (path.parent / WEIGHTS_FILE).is_file()
        and not any(part.startswith(".") for part in path.parent.relative_to(base).parts)
    )


def _snapshot(
    repo_id: str, patterns: list[str], revision: str | None, cache_dir: str | None, token: str | None
) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, allow_patterns=patterns, token=token
            )
        )
    except _network_errors() as exc:
        raise UserError(
            f"{repo_id!r} is not a local directory, and downloading it as a hub repository failed "
            f"({type(exc).__name__}: {exc}). Check the path or repo id; private repositories need HF_TOKEN "
            "or `hf auth login`; offline, the repository must already be in the hub cache."
        ) from None


def pull(
    repo_id_or_path: str | os.PathLike,
    *,
    folder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> Path:
    """A local directory holding the export: the path itself when it exists, else a snapshot of
    the hub repository (only `folder`'s files when given, else everything) in the hub cache."""
    local = Path(repo_id_or_path)
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{local} is a file; point to an export directory or one SAE folder in it.")
        return local
    repo_id = str(repo_id_or_path)
    check_repo_id(repo_id)
    names = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE)
    if folder is None:
        patterns = ["*"]
    else:
        prefix = folder.strip("/")
        patterns = [f"{prefix}/{n}" if prefix not in ("", ".") else n for n in names]
    return _snapshot(repo_id, patterns, revision, cache_dir, token)


def read_export(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cfg.json dict, weight tensors) of one exported SAE folder."""
    path = Path(folder)
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} holds no {CFG_FILE}; it is not an exported SAE folder.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path / CFG_FILE} is unreadable or not valid JSON ({exc}).") from exc
    if not isinstance(cfg, dict):
        raise UserError(f"{path / CFG_FILE} should hold a JSON object.")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise UserError(f"{path} holds no {WEIGHTS_FILE}; the export is incomplete.") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path / WEIGHTS_FILE} is corrupt or not a safetensors file ({exc}).") from exc
    return cfg, tensors


def _choose(folders: list[str], where: str) -> str:
    if not folders:
        raise UserError(f"{where} holds no exported SAE (no folder with {CFG_FILE} and {WEIGHTS_FILE}).")
    if len(folders) > 1:
        raise UserError(f"{where} holds {len(folders)} SAEs; pass folder= one of: {', '.join(folders)}.")
    return folders[0]


def load_exported(
    path_or_repo_id: str | os.PathLike,
    folder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> SAE:
    """An exported SAE as a sae_train inference SAE (acting on raw activations).

    path_or_repo_id: an export directory, one SAE folder in it, or a hub repo id. folder: the SAE
    folder inside it (e.g. "blocks.8.hook_resid_post"); may be left out when there is only one.
    Exports of sae_train come back exactly (architecture, config, weights, normalization_scale);
    other SAELens v6 SAEs load too where one of our architectures computes the same.
    """
    local = Path(path_or_repo_id)
    if local.exists():
        root = pull(local)
        target = root / (folder if folder is not None else _choose(find_exports(root), str(root)))
        if not _is_export_folder(target):
            found = find_exports(root)
            raise UserError(f"{target} is not an exported SAE folder; {root} holds: {', '.join(found) or 'none'}.")
    else:
        repo_id = str(path_or_repo_id)
        check_repo_id(repo_id)
        if folder is None:  # list the SAEs (their small cfg.json files) before fetching any weights
            listing = _snapshot(repo_id, [f"*{CFG_FILE}"], revision, cache_dir, token)
            folder = _choose(_cfg_folders(listing), repo_id)
        target = pull(repo_id, folder=folder, revision=revision, cache_dir=cache_dir, token=token) / folder
        if not _is_export_folder(target):
            raise UserError(
                f"Hub repository {repo_id} has no exported SAE in folder {folder!r} "
                f"({CFG_FILE} and {WEIGHTS_FILE} expected there)."
            )
    cfg, tensors = read_export(target)
    return from_saelens(cfg, tensors, source=str(target))


def _cfg_folders(root: Path) -> list[str]:
    """Folders below root holding a cfg.json (a hub listing fetched before any weights)."""
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(CFG_FILE))
