"""Finding the file of an open_clip pretrained tag, cache first, offline-safe.

open_clip fetches a tag's weights with ``huggingface_hub.hf_hub_download``,
which, without a network, retries each request with back-off (about a minute
in all) and logs a warning per try before giving up. Here the weights are
looked up in this order instead:

1. the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), read from
   disk only (``try_to_load_from_cache``): no network, no delay;
2. with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) nothing else: a
   tag that is not cached fails at once, without any network attempt;
3. otherwise one metadata request per candidate file, with a short timeout
   (``HF_HUB_ETAG_TIMEOUT`` when set, else :data:`PROBE_TIMEOUT_S` seconds)
   and no retries; only when the Hub answers is the file downloaded (with
   huggingface_hub's own progress and retries, the connection being known to
   work).

Tags that only have a plain URL (no ``hf_hub`` entry) use open_clip's own
download cache (``~/.cache/clip``) the same way. huggingface_hub's log
messages are silenced while this runs unless ``PFEDMOAP_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from pfedmoap_cli.errors import UserError

__all__ = ["PROBE_TIMEOUT_S", "hub_offline", "resolve_tag_weights"]

#: Seconds the Hub gets to answer the one metadata request (``HF_HUB_ETAG_TIMEOUT`` overrides).
PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "on", "yes", "true"}


def _debug() -> bool:
    return os.environ.get("PFEDMOAP_DEBUG", "") not in {"", "0"}


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (read from the environment now, and as huggingface_hub read it)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _probe_timeout() -> float:
    value = os.environ.get("HF_HUB_ETAG_TIMEOUT", "").strip()
    try:
        return float(value) if value else PROBE_TIMEOUT_S
    except ValueError:
        return PROBE_TIMEOUT_S


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings (PFEDMOAP_DEBUG=1 keeps them)."""
    if _debug():
        yield
        return
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _fix(model: str, tag: str) -> str:
    return (
        f"download them on a connected machine (python -c \"import open_clip; open_clip.create_model('{model}', "
        f"pretrained='{tag}')\" fills the Hugging Face cache; copy that HF_HOME here), pass a local checkpoint with "
        "--pretrained PATH, or use --pretrained none for random weights (tests only)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:160] if text else type(error).__name__)


def _hf_candidates(open_clip, hf_hub: str) -> tuple[str, list[str]]:
    """The Hub repo and the file names open_clip would try, in its order (safetensors first)."""
    from open_clip import pretrained as oc_pretrained

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME
    names: list[str] = []
    if getattr(oc_pretrained, "_has_safetensors", False):
        names.extend(oc_pretrained._get_safe_alternatives(filename))
    names.append(filename)
    return repo_id, names


def _from_hf_hub(open_clip, model: str, tag: str, hf_hub: str) -> str:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    repo_id, names = _hf_candidates(open_clip, hf_hub)
    for name in names:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    where = f"{repo_id} ({' or '.join(names)})"
    if hub_offline():
        raise UserError(
            f"pretrained weights {model}/{tag} are not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
            f"HF_HUB_OFFLINE is set, so they cannot be downloaded from {where}; {_fix(model, tag)}"
        )
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT
    timeout = _probe_timeout()
    with _quiet_hub():
        for name in names:
            url = huggingface_hub.hf_hub_url(repo_id, name, endpoint=endpoint)
            try:
                huggingface_hub.get_hf_file_metadata(url, timeout=timeout)  # retry_on_errors=False: one try
            except EntryNotFoundError:
                continue  # this repo has no such file; try the next name, as open_clip does
            except (RepositoryNotFoundError, GatedRepoError) as error:
                raise UserError(
                    f"the Hugging Face Hub refused {where} for pretrained weights {model}/{tag} "
                    f"({_first_line(error)}); {_fix(model, tag)}"
                ) from error
            except Exception as error:  # no network, DNS, proxy, timeout, Hub down
                raise UserError(
                    f"could not fetch pretrained weights {model}/{tag} (offline?): no answer from {endpoint} "
                    f"({type(error).__name__}: {_first_line(error)}; timeout {timeout:g} s, no retries); {_fix(model, tag)}"
                ) from error
            try:
                return huggingface_hub.hf_hub_download(
                    repo_id, name, endpoint=endpoint, etag_timeout=timeout,
                    library_name="open_clip", library_version=getattr(open_clip, "__version__", None),
                )
            except Exception as error:
                raise UserError(
                    f"could not fetch pretrained weights {model}/{tag} from {where} "
                    f"({type(error).__name__}: {_first_line(error)}); {_fix(model, tag)}"
                ) from error
    raise UserError(f"the Hugging Face Hub has none of {where} for pretrained weights {model}/{tag}; {_fix(model, tag)}")


def _from_url(model: str, tag: str, url: str) -> str:
    from open_clip.pretrained import download_pretrained_from_url

    # open_clip's URL cache: it reuses the file there when its checksum matches, without a request.
    cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    if not os.path.isfile(cached) and hub_offline():
        raise UserError(
            f"pretrained weights {model}/{tag} are not in {cached} and HF_HUB_OFFLINE is set, "
            f"so they cannot be downloaded from {url}; {_fix(model, tag)}"
        )
    try:
        return download_pretrained_from_url(url)
    except Exception as error:
        raise UserError(
            f"could not fetch pretrained weights {model}/{tag} (offline?) from {url} "
            f"({type(error).__name__}: {_first_line(error)}); {_fix(model, tag)}"
        ) from error


def resolve_tag_weights(open_clip, model: str, tag: str, tag_cfg: dict) -> str:
    """Path of the checkpoint file of open_clip's pretrained ``model``/``tag`` (see the module docstring).

    Raises
    ------
    UserError
        The weights are neither cached nor downloadable now; one line naming the fixes.
    """
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hf_hub = tag_cfg.get("hf_hub", "")
    url = tag_cfg.get("url", "")
    if hf_hub:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            hf_hub = ""
    if hf_hub:
        return _from_hf_hub(open_clip, model, tag, hf_hub)
    if url:
        return _from_url(model, tag, url)
    raise UserError(f"pretrained tag {model}/{tag} names no file, Hub repo or URL in open_clip's table; {_fix(model, tag)}")
