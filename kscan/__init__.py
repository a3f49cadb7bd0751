"""kscan: agentless host-side runtime integrity monitor for QEMU/KVM guest kernels.

This tiny package holds only what every other package shares: the version and the
root of the error tree (`kscan.errors`). The work lives in `translate/` (guest
addresses → host memory), `store/` (the database) and `scanner/` (everything that
talks to QEMU, reads kernels and watches VMs). Dependencies point one way:
`scanner` uses `translate` and `store`; those two know nothing of each other.
"""

__version__ = "0.1.0"
