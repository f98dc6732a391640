"""The one redactor: what is published (run.yaml, launch/plan.json, manifest.json, status.json), logged or
printed goes through here, so a password in ``storage.endpoint_url`` or a token in the environment never
leaves the process.

Masks the userinfo of every URL (``http://user:pw@host`` → ``http://***@host``), every query value
(``?X-Amz-Signature=…`` → ``?X-Amz-Signature=***``) and the value of every secret environment variable.
"""
from __future__ import annotations

import os
import re

MASK = "***"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN")
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>]+)")


def _url(m: re.Match) -> str:
    scheme, rest = m.group(1), m.group(2)
    trail = len(rest) - len(rest.rstrip(".,;:!)]}"))  # sentence punctuation after a URL stays outside it
    rest, after = (rest[:-trail], rest[-trail:]) if trail else (rest, "")
    slash = rest.find("/")
    netloc, tail = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    q = netloc.find("?")
    if q >= 0:  # http://host?x=1 (no path)
        netloc, tail = netloc[:q], netloc[q:] + tail
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_, frag = query.partition("#")
        masked = "&".join(f"{p.partition('=')[0]}={MASK}" if "=" in p else MASK for p in query.split("&") if p)
        tail = f"{path}?{masked}{hash_}{frag}"
    return scheme + netloc + tail + after


def text(s: str) -> str:
    """s with URL credentials, query values and secret environment values masked."""
    s = _URL.sub(_url, str(s))
    for var in SECRET_ENV:
        v = os.environ.get(var)
        if v and len(v) >= 8:
            s = s.replace(v, MASK)
    return s


def data(obj):
    """A copy of a JSON-like structure with every string passed through text()."""
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, dict):
        return {k: data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [data(v) for v in obj]
    return obj
