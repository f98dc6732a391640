"""Operating runs on a cluster: `sftjob submit | status | logs | cancel | resume | list`.

client.py (kubeconfig / in-cluster, API errors → exit codes), helm.py (a run is a Helm release),
inspect.py (Job + pods + Kueue + status.json → one view and the run's exit code), render.py (text,
progress bar), commands.py (one function per command). job/ops.py wires them into the CLI.
"""
