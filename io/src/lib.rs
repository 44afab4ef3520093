//! What both ociblk's overlay and its vhost-user-blk server need, below
//! either of them: scatter lists of host memory ([`iobuf`]) and the few
//! file syscalls neither std nor vmm-sys-util covers as needed ([`sys`]).

pub mod copy;
pub mod iobuf;
pub mod sys;
