//! Types shared by the ztna XDP program and userspace: control-connection wire
//! formats, stream frames, relay-CID layout. `no_std`, no allocation.
#![no_std]

pub mod wire;

pub use wire::{ControlMessage, NackStatus, WireError};
