//! Test support for ociblk: a vhost-user-blk client used by the integration tests and
//! the benchmark tool.

pub mod vhost_client;

pub mod bench;
pub mod oci;
pub mod process;
pub mod raw_vhost;
pub mod support;
