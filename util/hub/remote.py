"""The Hugging Face Hub's side: download a published model into the HF cache, upload a folder to a repo.

Downloads go through huggingface_hub's hf_hub_download: into the shared cache (HF_HUB_CACHE, else
HF_HOME/hub, else ~/.cache/huggingface/hub), resumable (a cut transfer continues from its .incomplete
file), size-checked, under a file lock (many processes may ask at once). Both files come from one
commit. With HF_HUB_OFFLINE=1 (or no network) the cached copy is used; without one every error is a
single line naming HF_HUB_OFFLINE and the cache folder. The environment is read when called, not at import.
"""
import logging
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from util.io.pretrained import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)
LIBRARY = "arinar"
TRUE = ("1", "on", "yes", "true")


def offline():
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment sets it now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in TRUE


def cache_dir():
    """The Hub cache folder as the environment sets it now (huggingface_hub's own rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        folder = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        folder = os.path.join(os.environ["HF_HOME"], "hub")
    else:
        folder = constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def download(repo_id, revision=None):
    """The local snapshot folder of Hub repo `repo_id` holding its config.json and model.safetensors (one commit)."""
    at = f"{repo_id}@{revision}" if revision else repo_id
    where = cache_dir() / f"models--{repo_id.replace('/', '--')}"
    local_only = offline()
    get = dict(repo_id=repo_id, cache_dir=cache_dir(), local_files_only=local_only, library_name=LIBRARY,
               endpoint=os.environ.get("HF_ENDPOINT") or None)
    fetching = CONFIG_NAME
    try:
        config = Path(hf_hub_download(filename=CONFIG_NAME, revision=revision, **get))
        commit = config.parent.name  # snapshots/<commit>/config.json: the weights come from the same commit
        if not local_only:
            logger.info("downloading %s (%s) into %s", at, WEIGHTS_NAME, where)
        fetching = WEIGHTS_NAME
        weights = Path(hf_hub_download(filename=WEIGHTS_NAME, revision=commit, **get))
    except LocalEntryNotFoundError as err:
        if local_only:
            why = ("HF_HUB_OFFLINE=1 is set: fetch it once where there is network (`python -m util.hub download "
                   f"{at}` without HF_HUB_OFFLINE) or point HF_HUB_CACHE at a cache that holds it")
        else:
            why = (f"the Hub could not be reached ({_first_line(err.__cause__ or err)}): connect and run again, or "
                   "point HF_HUB_CACHE at a cache that holds it (HF_HUB_OFFLINE=1 then skips the network)")
        raise FileNotFoundError(f"{at}: no such local file or folder, and no cached copy of Hub repo {repo_id} in "
                                f"{where} while {why}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{at}: no such local file or folder, and no Hub model repo {repo_id} (or it is "
                                "private or gated: log in with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{at}: Hub repo {repo_id} has no revision {revision!r}") from None
    except RemoteEntryNotFoundError:
        raise FileNotFoundError(f"{at}: Hub repo {repo_id} has no {fetching}: not an arinar model folder (published "
                                "with `python -m util.hub push`; only safetensors weights are read)") from None
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"{at}: download from the Hub failed ({_first_line(err)}); run again to resume, "
                                f"or set HF_HUB_OFFLINE=1 to use the cache in {where}") from None
    if weights.parent != config.parent:
        raise ValueError(f"{at}: {CONFIG_NAME} and {WEIGHTS_NAME} resolved to different snapshots in {where}")
    return config.parent


def upload(folder, repo_id, private=False, token=None):
    """Create `repo_id` (a model repo; kept if it exists) and upload the folder's files in one commit; its URL."""
    if offline():
        raise ValueError(f"--repo {repo_id}: HF_HUB_OFFLINE is set, and pushing needs the network (write the "
                         "files with --local_dir DIR instead)")
    api = HfApi(token=token, library_name=LIBRARY)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        logger.info("uploading %s to https://huggingface.co/%s", folder, repo_id)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message="Upload arinar model (python -m util.hub push)")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = (": log in with `hf auth login` or set HF_TOKEN (a token with write access)"
                if status in (401, 403) else "; run the command again")
        raise ValueError(f"--repo {repo_id}: upload failed ({_first_line(err)}){hint}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
