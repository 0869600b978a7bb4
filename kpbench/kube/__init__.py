"""The kind and cluster backends: real Kubernetes.

Modules: `preflight` (checks before anything is created), `manifests` (renders the templates
in manifests/, shipped in the wheel), `cluster` (kind and Docker CLIs), `api` (the narrow
KubeApi and its kubernetes-client implementation), `verify` (data plane read back), `driver`
(one cell), `backend` (KindBackend, ClusterBackend), `dryrun` (`--dry-run`: what a kind run
would apply).
"""
