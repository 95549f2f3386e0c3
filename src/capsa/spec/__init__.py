"""Immutable descriptions of VMs (:mod:`capsa.spec.vm`), their shared folders
(:mod:`capsa.spec.shares`) and their JSON form (:mod:`capsa.spec.codec`); network
descriptions live beside the network stack in :mod:`capsa.net.spec`."""
