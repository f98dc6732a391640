"""sftjob: supervised fine-tuning of chat models as a Kubernetes batch job."""
__version__ = "0.1.0"
