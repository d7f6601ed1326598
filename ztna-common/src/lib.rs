//! Types shared by the ztna XDP program and userspace: control-connection wire
//! formats, relay-session stream frames, relay-CID layout and BPF map types.
//! `no_std`, no allocation.
#![no_std]

pub mod frames;
pub mod relay;
pub mod wire;

pub use wire::{ControlMessage, NackStatus, WireError};
