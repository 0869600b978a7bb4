"""Differential conformance of the IPVS model (`kpbench.dataplane`) against a real kernel.

`scenarios` makes seeded plans of what kube-proxy does to one virtual server, `guest` carries
them out on a kernel's IPVS with real TCP connections (inside the kernel VM, `kpbench.vm`) and
records every decision and counter, `replay` feeds the same trace through the model and counts
where the two disagree, and `run` ties them together for `nox -s kernel-conformance`.
"""
