"""sftjob: supervised fine-tuning of chat models as a Kubernetes batch job."""
__version__ = "0.1.0"  # the one place: pyproject reads it, the chart's appVersion must match (tests/test_version.py)


def version() -> str:
    """The installed distribution's version (what manifests and status.json record), else this source tree's."""
    from importlib import metadata

    try:
        return metadata.version("sftjob")
    except metadata.PackageNotFoundError:  # run from a checkout via PYTHONPATH, not installed
        return __version__
