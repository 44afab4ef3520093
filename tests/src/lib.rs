//! Test support for ociblk, shared by every integration test: finding the
//! programs, `ociblk serve` and QEMU guests as child processes, one node
//! helper, OCI images built on the fly and a raw vhost-user frontend.

pub mod oci;
pub mod process;
pub mod raw_vhost;
pub mod support;
