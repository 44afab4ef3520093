//! Test support for ociblk, shared by every integration test: finding and
//! running the programs, `ociblk serve`, QEMU guests and
//! `qemu-storage-daemon` as child processes (on the launch harness's own
//! process and console code), one test node helper, OCI images built on the
//! fly and a raw vhost-user frontend.

pub mod cluster;
pub mod node;
pub mod oci;
pub mod process;
pub mod raw_vhost;
pub mod support;
