"""One logging setup for the entrypoint and every training rank: our INFO lines, third parties quiet.

Known-harmless deprecation warnings from the libraries we pin are hidden (``--debug`` shows them):
they say nothing a user can act on and bury the lines that matter in a pod's log.
"""
from __future__ import annotations

import logging
import sys
import warnings

NOISY = ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "DeepSpeed", "matplotlib", "PIL", "fsspec")
HARMLESS = (  # (category, message regex): emitted inside transformers/peft, not by our calls
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
)


def setup(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not debug:
        for category, message in HARMLESS:
            warnings.filterwarnings("ignore", message=message, category=category)
